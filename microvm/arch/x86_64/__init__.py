"""x86-64 machine setup: segments, page tables, CPU registers, CPUID, MSRs."""
