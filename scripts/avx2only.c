/*
 * An LD_PRELOAD shim under which a process sees its x86-64 CPU without
 * AVX-512 or AMX: the CPUID instruction is made to fault for the process
 * (Linux's ARCH_SET_CPUID, on CPUs with CPUID faulting: /proc/cpuinfo's
 * `cpuid_fault` flag, which VMs commonly offer) and each fault is answered
 * with the CPU's own CPUID values less the AVX-512 / AMX feature bits and
 * the opmask / ZMM state components. Libraries that choose kernels from
 * CPUID (ONNX Runtime's MLAS, oneDNN, numpy) then run their AVX2 paths, so
 * one AVX-512 machine can time ONNX Runtime on the path an AVX2-only CPU
 * would run (`scripts/bench_reference.py --isa avx2` builds and uses it).
 * Caches, clocks and the memory system stay this machine's: a proxy for an
 * AVX2-only CPU, not one. Not used by CI or by wick.
 *
 *     cc -O2 -shared -fPIC -o avx2only.so scripts/avx2only.c
 *     LD_PRELOAD=$PWD/avx2only.so python3 ...
 *
 * Exits with status 3 (and a message) at load where CPUID faulting is
 * unavailable, rather than run unmasked. Threads inherit the faulting
 * setting from the thread that loads the shim (before any is made). A
 * program that later installs its own SIGSEGV handler takes the faults
 * away from the shim (Python does not, unless faulthandler is enabled).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static int set_cpuid(int enabled) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

/* Leaf 7, subleaf 0: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL (EBX);
 * AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ (ECX); AVX512_4VNNIW,
 * 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 (EDX). */
#define LEAF7_EBX ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
#define LEAF7_ECX ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
#define LEAF7_EDX ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {
        /* A real fault: let it kill the process as it would have. */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    set_cpuid(1);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        b &= ~LEAF7_EBX;
        c &= ~LEAF7_ECX;
        d &= ~LEAF7_EDX;
    }
    if (leaf == 7 && sub == 1)
        a &= ~(1u << 5); /* AVX512_BF16 */
    if (leaf == 0xd && sub == 0)
        a &= ~0xe0u; /* opmask, ZMM_Hi256, Hi16_ZMM state */
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void mask_avx512(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, 0);
    if (set_cpuid(0) != 0) {
        static const char message[] = "avx2only: this CPU or kernel has no CPUID faulting (ARCH_SET_CPUID)\n";
        (void)!write(2, message, sizeof message - 1);
        _exit(3);
    }
}
