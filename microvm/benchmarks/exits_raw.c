/* The baselines for microvm/benchmarks/exits.py: the same real-mode guest, driven by a
 * bare C loop over KVM_RUN with no dispatch at all.
 * As a program (raw-c): its own VM, in its own process. Prints ns per exit.
 *   Usage: exits_raw N CODE_HEX CODE_ADDRESS (the guest's code, where it starts).
 * Built with -DEXITS_LIB -shared (raw-c-here): exits_loop() runs the VM microvm made,
 * in microvm's process, called through ctypes (which releases the GIL around it). */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#define MEM 0x10000

/* KVM_RUN until an exit other than port I/O; the number of port-I/O exits in *exits,
 * the ns per exit returned (-1 and errno if KVM_RUN or the run page's mapping failed). */
double exits_loop(int vcpu, long *exits) {
    struct kvm_run *run = mmap(NULL, 4096, PROT_READ, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) return -1;
    long n = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            munmap(run, 4096);
            return -1;
        }
        if (run->exit_reason != KVM_EXIT_IO) break;
        n++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    munmap(run, 4096);
    *exits = n;
    return ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (n ? n : 1);
}

#ifndef EXITS_LIB
static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s N CODE_HEX CODE_ADDRESS\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]);
    const uint8_t *code = (const uint8_t *)argv[2]; /* hex */
    unsigned long at = strtoul(argv[3], NULL, 0);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; code[2 * i]; i++) {
        unsigned b;
        sscanf((const char *)code + 2 * i, "%2x", &b);
        mem[at + i] = b;
    }
    memcpy(mem + at + 2, &n, 4); /* patch the loop count (mov ecx, imm32) */
    struct kvm_userspace_memory_region region = {0, 0, 0, MEM, (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    ioctl(vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs = {.rip = at, .rflags = 2};
    ioctl(vcpu, KVM_SET_REGS, &regs);
    long exits = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason == KVM_EXIT_IO) { exits++; continue; }
        if (run->exit_reason == KVM_EXIT_HLT) break;
        fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    printf("%ld %.1f\n", exits, ns / exits);
    return 0;
}
#endif
