# Declarations from <linux/kvm.h> (and <asm/kvm.h>, which it includes).
# Only `cdef extern` here: the C compiler checks every layout against the
# kernel's own header, so no struct offset is ever written by hand.
cdef extern from "<linux/types.h>" nogil:
    ctypedef unsigned char __u8
    ctypedef unsigned short __u16
    ctypedef unsigned int __u32
    ctypedef signed int __s32
    ctypedef unsigned long long __u64


cdef extern from "<linux/kvm.h>" nogil:
    int KVM_API_VERSION

    # /dev/kvm ioctls
    unsigned long KVM_GET_API_VERSION
    unsigned long KVM_CREATE_VM
    unsigned long KVM_CHECK_EXTENSION
    unsigned long KVM_GET_VCPU_MMAP_SIZE
    unsigned long KVM_GET_SUPPORTED_CPUID
    unsigned long KVM_GET_MSR_INDEX_LIST
    unsigned long KVM_GET_MSR_FEATURE_INDEX_LIST

    # VM ioctls
    unsigned long KVM_SET_USER_MEMORY_REGION
    unsigned long KVM_CREATE_IRQCHIP
    unsigned long KVM_CREATE_PIT2
    unsigned long KVM_SET_TSS_ADDR
    unsigned long KVM_SET_IDENTITY_MAP_ADDR
    unsigned long KVM_IRQ_LINE
    unsigned long KVM_IRQFD
    unsigned long KVM_IOEVENTFD
    unsigned long KVM_GET_CLOCK
    unsigned long KVM_SET_CLOCK
    unsigned long KVM_GET_IRQCHIP
    unsigned long KVM_SET_IRQCHIP
    unsigned long KVM_GET_PIT2
    unsigned long KVM_SET_PIT2
    unsigned long KVM_CREATE_VCPU

    # vCPU ioctls
    unsigned long KVM_RUN
    unsigned long KVM_GET_REGS
    unsigned long KVM_SET_REGS
    unsigned long KVM_GET_SREGS
    unsigned long KVM_SET_SREGS
    unsigned long KVM_GET_FPU
    unsigned long KVM_SET_FPU
    unsigned long KVM_GET_CPUID2
    unsigned long KVM_SET_CPUID2
    unsigned long KVM_GET_MSRS
    unsigned long KVM_SET_MSRS
    unsigned long KVM_GET_LAPIC
    unsigned long KVM_SET_LAPIC
    unsigned long KVM_GET_MP_STATE
    unsigned long KVM_SET_MP_STATE
    unsigned long KVM_GET_XSAVE
    unsigned long KVM_SET_XSAVE
    unsigned long KVM_GET_XCRS
    unsigned long KVM_SET_XCRS
    unsigned long KVM_GET_VCPU_EVENTS
    unsigned long KVM_SET_VCPU_EVENTS
    unsigned long KVM_GET_DEBUGREGS
    unsigned long KVM_SET_DEBUGREGS
    unsigned long KVM_GET_TSC_KHZ

    # exit reasons
    int KVM_EXIT_UNKNOWN
    int KVM_EXIT_EXCEPTION
    int KVM_EXIT_IO
    int KVM_EXIT_HYPERCALL
    int KVM_EXIT_DEBUG
    int KVM_EXIT_HLT
    int KVM_EXIT_MMIO
    int KVM_EXIT_IRQ_WINDOW_OPEN
    int KVM_EXIT_SHUTDOWN
    int KVM_EXIT_FAIL_ENTRY
    int KVM_EXIT_INTR
    int KVM_EXIT_INTERNAL_ERROR
    int KVM_EXIT_SYSTEM_EVENT
    int KVM_EXIT_IO_IN
    int KVM_EXIT_IO_OUT

    # flags
    __u32 KVM_MEM_LOG_DIRTY_PAGES
    __u32 KVM_MEM_READONLY
    __u32 KVM_IRQFD_FLAG_DEASSIGN
    __u32 KVM_IOEVENTFD_FLAG_DATAMATCH
    __u32 KVM_IOEVENTFD_FLAG_PIO
    __u32 KVM_IOEVENTFD_FLAG_DEASSIGN
    __u32 KVM_PIT_SPEAKER_DUMMY

    struct kvm_userspace_memory_region:
        __u32 slot
        __u32 flags
        __u64 guest_phys_addr
        __u64 memory_size
        __u64 userspace_addr

    struct kvm_irq_level:
        __u32 irq
        __u32 level

    struct kvm_irqfd:
        __u32 fd
        __u32 gsi
        __u32 flags
        __u32 resamplefd

    struct kvm_ioeventfd:
        __u64 datamatch
        __u64 addr
        __u32 len
        __s32 fd
        __u32 flags

    struct kvm_clock_data:
        __u64 clock
        __u32 flags

    struct kvm_pit_config:
        __u32 flags

    struct kvm_irqchip:
        __u32 chip_id

    struct kvm_pit_state2:
        pass

    struct kvm_mp_state:
        __u32 mp_state

    # struct kvm_run: only the fields and union members microvm reads.
    struct _kvm_run_io:
        __u8 direction
        __u8 size
        __u16 port
        __u32 count
        __u64 data_offset

    struct _kvm_run_mmio:
        __u64 phys_addr
        __u8 data[8]
        __u32 len
        __u8 is_write

    struct _kvm_run_fail_entry:
        __u64 hardware_entry_failure_reason
        __u32 cpu

    struct _kvm_run_internal:
        __u32 suberror
        __u32 ndata
        __u64 data[16]

    struct _kvm_run_system_event:
        __u32 type
        __u32 ndata
        __u64 data[16]

    struct _kvm_run_hw:
        __u64 hardware_exit_reason

    struct kvm_run:
        __u8 request_interrupt_window
        __u8 immediate_exit
        __u32 exit_reason
        __u8 if_flag
        _kvm_run_hw hw
        _kvm_run_io io
        _kvm_run_mmio mmio
        _kvm_run_fail_entry fail_entry
        _kvm_run_internal internal
        _kvm_run_system_event system_event


cdef extern from "<asm/kvm.h>" nogil:
    int KVM_NR_INTERRUPTS

    struct kvm_regs:
        __u64 rax, rbx, rcx, rdx
        __u64 rsi, rdi, rsp, rbp
        __u64 r8, r9, r10, r11
        __u64 r12, r13, r14, r15
        __u64 rip, rflags

    struct kvm_segment:
        __u64 base
        __u32 limit
        __u16 selector
        __u8 type
        __u8 present, dpl, db, s, l, g, avl
        __u8 unusable

    struct kvm_dtable:
        __u64 base
        __u16 limit

    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss
        kvm_segment tr, ldt
        kvm_dtable gdt, idt
        __u64 cr0, cr2, cr3, cr4, cr8
        __u64 efer
        __u64 apic_base
        __u64 interrupt_bitmap[4]

    struct kvm_fpu:
        __u8 fpr[8][16]
        __u16 fcw
        __u16 fsw
        __u8 ftwx
        __u16 last_opcode
        __u64 last_ip
        __u64 last_dp
        __u8 xmm[16][16]
        __u32 mxcsr

    struct kvm_msr_entry:
        __u32 index
        __u64 data

    struct kvm_msrs:
        __u32 nmsrs
        kvm_msr_entry entries[0]

    struct kvm_msr_list:
        __u32 nmsrs
        __u32 indices[0]

    struct kvm_cpuid_entry2:
        __u32 function
        __u32 index
        __u32 flags
        __u32 eax
        __u32 ebx
        __u32 ecx
        __u32 edx

    struct kvm_cpuid2:
        __u32 nent
        kvm_cpuid_entry2 entries[0]

    struct kvm_lapic_state:
        char regs[1024]

    struct kvm_xsave:
        __u32 region[1024]

    struct kvm_xcr:
        __u32 xcr
        __u64 value

    struct kvm_xcrs:
        __u32 nr_xcrs
        __u32 flags
        kvm_xcr xcrs[16]

    struct kvm_vcpu_events:
        pass

    struct kvm_debugregs:
        __u64 db[4]
        __u64 dr6
        __u64 dr7
        __u64 flags


cdef extern from "<linux/kvm.h>" nogil:
    # Capabilities microvm asks for (KVM_CHECK_EXTENSION arguments).
    int KVM_CAP_IRQCHIP
    int KVM_CAP_HLT
    int KVM_CAP_USER_MEMORY
    int KVM_CAP_SET_TSS_ADDR
    int KVM_CAP_EXT_CPUID
    int KVM_CAP_NR_VCPUS
    int KVM_CAP_MAX_VCPUS
    int KVM_CAP_MP_STATE
    int KVM_CAP_PIT2
    int KVM_CAP_PIT_STATE2
    int KVM_CAP_IRQFD
    int KVM_CAP_IOEVENTFD
    int KVM_CAP_ADJUST_CLOCK
    int KVM_CAP_SET_IDENTITY_MAP_ADDR
    int KVM_CAP_VCPU_EVENTS
    int KVM_CAP_DEBUGREGS
    int KVM_CAP_XSAVE
    int KVM_CAP_XCRS
    int KVM_CAP_IMMEDIATE_EXIT
    int KVM_CAP_TSC_DEADLINE_TIMER
    int KVM_CAP_IRQ_ROUTING
    int KVM_CAP_GET_MSR_FEATURES
    int KVM_CAP_NR_MEMSLOTS
    int KVM_CAP_READONLY_MEM
