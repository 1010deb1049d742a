from microvm.cli import main

main()
