"""Host-side backends of guest devices: raw disk images (disk.py) and taps (tap.py).

A backend knows the host resource and nothing of virtio; the device in
microvm/devices/virtio/ speaks to the guest and calls its backend.
"""
