// runtime.cpp: the fiber scheduler behind shim.h. Compiled into every emulated
// kernel library (one copy per library; symbols hidden).
//
// A launch runs the grid's blocks one after another on the calling OS thread.
// Within a block every CUDA thread is a fiber with its own stack. A fiber runs
// until it reaches a barrier it cannot pass yet (__syncthreads, a warp
// operation) or exits, then switches directly to the next runnable fiber in
// the block's order (linear thread index; reversed or shuffled with
// LLMCU_EMU_ORDER=reverse|random). The last fiber to reach a barrier releases
// it and runs on. No runnable fiber while some are still alive is a deadlock.
//
// In those orders the warps advance together: every warp operation (a shuffle
// inside an emulated mma, say) hands over to the next warp, so a warp seldom
// runs far ahead of the others and a missing __syncthreads between one warp's
// shared-memory writes and another's reads usually goes unseen. The warp-serial
// orders (LLMCU_EMU_ORDER=warps|warps-reverse) run one warp as far as it can go
// (its lanes take turns at its warp operations) before any other warp runs: each
// warp reaches the next __syncthreads (or exits) alone, first to last or last to
// first, so a warp that reads shared memory another warp has not written yet (or
// overwrites what another has not read yet) without a barrier in between sees
// stale or NaN-poisoned data and the test fails.
//
// Errors (divergent barrier, deadlock, shuffle from an exited lane, device
// assert) switch straight back to the launcher, which returns 1; the Python
// side reads emu_last_error() and raises EmuError. A segfault (bad pointer,
// stack overflow into a guard page) still kills the process.
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <unistd.h>


#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#endif

// Bounds of the static __shared__ variables (shim.h puts them all in section
// emu_shared; the linker defines these; weak: a file may have none).
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));
// ... and of the template and inline functions' statics, gathered by emu_shared.ld (absent in
// ASan builds, which link without it).
extern "C" char __start_emu_shared_t[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared_t[] __attribute__((weak, visibility("hidden")));

uint3 emu_g_threadIdx;
uint3 emu_g_blockIdx;
dim3 emu_g_blockDim;
dim3 emu_g_gridDim;

namespace {

// ---------------------------------------------------------------------------
// Context switch. x86-64: save the six callee-saved registers on the old
// stack, swap rsp, pop them from the new one (about 50-65 ns a resume against
// 590-750 ns for swapcontext, which makes a sigprocmask syscall each time; see
// EMULATION.md). The x87/MXCSR control words are not saved. Elsewhere, or
// with -DLLMCU_EMU_UCONTEXT, ucontext.
#if defined(__x86_64__) && !defined(LLMCU_EMU_UCONTEXT)
#define EMU_SWITCH "asm"
struct Ctx { void* sp; };
extern "C" void emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void emu_ctx_trampoline();
asm(R"(
    .text
    .p2align 4
    .globl emu_ctx_switch
    .hidden emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch

    .p2align 4
    .globl emu_ctx_trampoline
    .hidden emu_ctx_trampoline
    .type emu_ctx_trampoline, @function
emu_ctx_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_ctx_trampoline, .-emu_ctx_trampoline
)");
inline void ctx_switch(Ctx* from, Ctx* to) { emu_ctx_switch(&from->sp, to->sp); }
void ctx_init(Ctx* c, char* top, void (*fn)(void*), void* arg) {
    uintptr_t s = (uintptr_t)top & ~(uintptr_t)15;  // rsp after the final ret: 16-aligned
    void** sp = (void**)(s - 56);
    sp[0] = nullptr;                      // r15
    sp[1] = nullptr;                      // r14
    sp[2] = (void*)fn;                    // r13: called by the trampoline
    sp[3] = arg;                          // r12: its argument
    sp[4] = nullptr;                      // rbx
    sp[5] = nullptr;                      // rbp
    sp[6] = (void*)&emu_ctx_trampoline;   // return address of the switch
    c->sp = sp;
}
#else
#include <ucontext.h>
#define EMU_SWITCH "ucontext"
struct Ctx { ucontext_t uc; };
inline void ctx_switch(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }
void (*g_uc_fn)(void*);
void uc_entry(unsigned int lo, unsigned int hi) {
    g_uc_fn((void*)(((uintptr_t)hi << 32) | lo));
}
void ctx_init(Ctx* c, char* top, void (*fn)(void*), void* arg, char* bottom) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = bottom;
    c->uc.uc_stack.ss_size = (size_t)(top - bottom) & ~(size_t)15;
    c->uc.uc_link = nullptr;
    g_uc_fn = fn;
    uintptr_t a = (uintptr_t)arg;
    makecontext(&c->uc, (void (*)())uc_entry, 2, (unsigned int)(a & 0xffffffffu), (unsigned int)(a >> 32));
}
#endif

// ---------------------------------------------------------------------------
enum State { RUNNABLE, WAIT_BLOCK, WAIT_WARP, EXITED };

struct Warp;
struct Thread {
    Ctx ctx;
    uint3 tid;
    unsigned int linear, lane, pos;
    Warp* warp;
    State state;
    const char* file;  // where it waits
    int line;
    const char* what;
    char* stack_lo;  // lowest usable byte of its stack
    char* stack_top;
    unsigned int cp_count;  // cp.async copies issued and not yet landed (cp_pending)
    unsigned int cp_group;  // groups committed so far = the id of the open group
};

// cp.async (emu_cp_async): one copy issued by a thread and not landed yet. Its source is
// read at issue; its destination holds the 0xFF poison until a wait lands it.
enum { EMU_CP_MAX = 256 };  // per thread: a tile load issues a handful per stage
struct CpAsync {
    void* dst;
    unsigned char data[16];
    unsigned int bytes;
    unsigned int group;
};

struct Warp {
    unsigned int present;  // lanes that exist (a partial last warp has fewer)
    unsigned int exited;
    unsigned int arrived;  // lanes waiting in the current operation
    unsigned int mask;     // the current operation's mask
    int kind;
    const char* file;
    int line;
    unsigned int gen;
    unsigned int written[2];  // double-buffered exchange area
    unsigned long long vals[2][32];
    Thread* lanes[32];
};

struct BlockBarrier {
    int arrived;
    const char* file;
    int line;
    unsigned int gen;
    int acc[2];  // __syncthreads_count/and/or, double-buffered like the warps
};

struct Launch {
    const char* kernel = "";
    emu_body_fn body = nullptr;
    void** args = nullptr;
    Ctx main;
    Thread* threads = nullptr;  // capacity: `cap` threads, cap/32 warps
    Warp* warps = nullptr;
    Thread** order = nullptr;
    unsigned int cap = 0;
    unsigned int n = 0, live = 0;
    BlockBarrier bar;
    bool in_fiber = false;
    bool failed = false;
    bool warp_serial = false;  // LLMCU_EMU_ORDER=warps|warps-reverse (switch_to_next)
    bool cp_late = true;       // LLMCU_EMU_CP_ASYNC=late (default) | eager
    CpAsync (*cp_pending)[EMU_CP_MAX] = nullptr;  // [cap][EMU_CP_MAX]
    char error[4096];
    unsigned char* dyn_shared = nullptr;
    size_t dyn_cap = 0, dyn_size = 0;
    unsigned long long switches = 0;
    unsigned long long rng = 0x9E3779B97F4A7C15ull;
    // fiber stacks: one mapping, a PROT_NONE guard page under each stack
    char* stacks = nullptr;
    size_t stacks_bytes = 0, stack_stride = 0, stack_size = 0;
    unsigned int stacks_count = 0;
};
Launch L;
Thread* g_cur = nullptr;

inline void set_current(Thread* t) {
    g_cur = t;
    emu_g_threadIdx = t->tid;
}

[[noreturn]] void fail_in_fiber();

// Names for messages; each call returns one of a few rotating buffers.
const char* thread_name(const Thread* t) {
    static char bufs[4][96];
    static int k = 0;
    char* buf = bufs[k++ & 3];
    snprintf(buf, 96, "thread (%u,%u,%u) [warp %u lane %u]", t->tid.x, t->tid.y, t->tid.z, t->linear / 32,
             t->lane);
    return buf;
}

// Record an error and, inside a fiber, abandon the block: switch back to the
// launcher, which never resumes this fiber (its stack is reused next launch).
[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (!L.failed) {
        L.failed = true;
        snprintf(L.error, sizeof L.error, "kernel %s, block (%u,%u,%u): %s", L.kernel, emu_g_blockIdx.x,
                 emu_g_blockIdx.y, emu_g_blockIdx.z, buf);
    }
    fail_in_fiber();
}

void fail_in_fiber() {
    Thread* t = g_cur;
    L.in_fiber = false;
    ctx_switch(&t->ctx, &L.main);
    __builtin_unreachable();
}

void deadlock(Thread* self) {
    // Group the waiting threads by where they wait.
    static char msg[1800];
    size_t used = (size_t)snprintf(msg, sizeof msg, "deadlock: no thread can proceed;");
    static bool done[1024];
    memset(done, 0, sizeof done);
    for (unsigned int i = 0; i < L.n && used < sizeof msg; i++) {
        Thread& t = L.threads[i];
        if (done[i] || t.state == EXITED || t.state == RUNNABLE) continue;
        unsigned int count = 0;
        for (unsigned int j = i; j < L.n; j++) {
            Thread& u = L.threads[j];
            if (!done[j] && u.state == t.state && u.line == t.line && u.what == t.what &&
                strcmp(u.file, t.file) == 0) {
                done[j] = true;
                count++;
            }
        }
        used += (size_t)snprintf(msg + used, sizeof msg - used, " %u thread(s) wait at %s (%s:%d), first %s;",
                                 count, t.what, t.file, t.line, thread_name(&t));
    }
    if (used < sizeof msg) snprintf(msg + used, sizeof msg - used, " %u of %u exited", L.n - L.live, L.n);
    (void)self;
    fail("%s", msg);
}

// Leave `self` (blocked or exited) for the next runnable fiber in order (in the
// warp-serial orders: another lane of its own warp first).
// Continue with c if it can run (switching to it unless it is self); false if it cannot.
inline bool resume_if_runnable(Thread* self, Thread* c) {
    if (c->state != RUNNABLE) return false;
    if (c != self) {
        L.switches++;
        set_current(c);
        ctx_switch(&self->ctx, &c->ctx);
    }
    return true;
}

void switch_to_next(Thread* self) {
    if (L.warp_serial) {
        Warp* w = self->warp;
        for (unsigned int k = 1; k <= 32; k++) {
            unsigned int lane = (self->lane + k) % 32;
            if (((w->present >> lane) & 1u) && resume_if_runnable(self, w->lanes[lane])) return;
        }
    }
    unsigned int n = L.n, pos = self->pos;
    for (unsigned int k = 1; k <= n; k++) {
        unsigned int q = pos + k;
        if (q >= n) q -= n;
        if (resume_if_runnable(self, L.order[q])) return;
    }
    if (L.live == 0) {
        L.in_fiber = false;
        ctx_switch(&self->ctx, &L.main);
        __builtin_unreachable();
    }
    deadlock(self);
}

void release_block() {
    BlockBarrier& b = L.bar;
    b.arrived = 0;
    b.gen++;
    b.acc[b.gen & 1] = 0;
    for (unsigned int i = 0; i < L.n; i++)
        if (L.threads[i].state == WAIT_BLOCK) L.threads[i].state = RUNNABLE;
}

void release_warp(Warp* w) {
    w->arrived = 0;
    w->gen++;
    w->written[w->gen & 1] = 0;
    for (int i = 0; i < 32; i++)
        if ((w->present >> i) & 1u)
            if (w->lanes[i]->state == WAIT_WARP) w->lanes[i]->state = RUNNABLE;
}

inline bool warp_complete(const Warp* w) {
    unsigned int need = w->mask & w->present & ~w->exited;
    return (w->arrived & need) == need;
}

void thread_exit(Thread* t) {
    t->state = EXITED;
    L.live--;
    Warp* w = t->warp;
    w->exited |= 1u << t->lane;
    if (L.bar.arrived > 0 && (unsigned int)L.bar.arrived == L.live) release_block();
    if (w->arrived && warp_complete(w)) release_warp(w);
    switch_to_next(t);
    __builtin_unreachable();
}

void fiber_main(void* arg) {
    Thread* t = (Thread*)arg;
    L.body(L.args);
    thread_exit(t);
}

const char* sync_name(int kind) {
    switch (kind) {
        case EMU_SYNC_COUNT: return "__syncthreads_count";
        case EMU_SYNC_AND: return "__syncthreads_and";
        case EMU_SYNC_OR: return "__syncthreads_or";
    }
    return "__syncthreads";
}
const char* warp_name(int kind) {
    switch (kind) {
        case EMU_WARP_SHFL: return "a warp shuffle";
        case EMU_WARP_VOTE: return "a warp vote";
        case EMU_WARP_REDUCE: return "a warp reduce";
    }
    return "__syncwarp";
}

bool same_site(const char* f1, int l1, const char* f2, int l2) {
    return l1 == l2 && (f1 == f2 || strcmp(f1, f2) == 0);
}

size_t env_stack_size() {
    const char* s = getenv("LLMCU_EMU_STACK");
    size_t size = 64 * 1024;
    if (s && *s) {
        char* end;
        double v = strtod(s, &end);
        if (*end == 'k' || *end == 'K') v *= 1024;
        else if (*end == 'm' || *end == 'M') v *= 1024 * 1024;
        if (v >= 16 * 1024) size = (size_t)v;
    }
    return size;
}

bool ensure_stacks(unsigned int count, size_t size) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size = (size + page - 1) / page * page;
    if (L.stacks && L.stacks_count >= count && L.stack_size == size) return true;
    if (L.stacks) munmap(L.stacks, L.stacks_bytes);
    L.stacks = nullptr;
    size_t stride = size + page;
    size_t bytes = stride * count;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    L.stacks = (char*)p;
    L.stacks_bytes = bytes;
    L.stack_stride = stride;
    L.stack_size = size;
    L.stacks_count = count;
    for (unsigned int i = 0; i < count; i++) mprotect(L.stacks + i * stride, page, PROT_NONE);
    return true;
}

void start_block(unsigned int order_mode) {
    unsigned int n = L.n;
    L.live = n;
    L.bar = BlockBarrier{0, nullptr, 0, 0, {0, 0}};
    for (unsigned int wi = 0; wi < (n + 31) / 32; wi++) {
        Warp& w = L.warps[wi];
        unsigned int first = wi * 32;
        unsigned int lanes = n - first < 32 ? n - first : 32;
        w.present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        w.exited = w.arrived = w.mask = 0;
        w.gen = 0;
        w.written[0] = w.written[1] = 0;
        w.file = nullptr;
        w.line = 0;
    }
    for (unsigned int i = 0; i < n; i++) {
        Thread& t = L.threads[i];
        t.state = RUNNABLE;
        t.cp_count = t.cp_group = 0;  // copies a previous block left in flight died with it
        t.file = nullptr;
        t.line = 0;
        t.what = "";
#if defined(__x86_64__) && !defined(LLMCU_EMU_UCONTEXT)
        ctx_init(&t.ctx, t.stack_top, fiber_main, &t);
#else
        ctx_init(&t.ctx, t.stack_top, fiber_main, &t, t.stack_lo);
#endif
    }
    for (unsigned int i = 0; i < n; i++) L.order[i] = &L.threads[i];
    if (order_mode == 1) {
        for (unsigned int i = 0; i < n; i++) L.order[i] = &L.threads[n - 1 - i];
    } else if (order_mode == 4) {  // warps last to first, each warp's lanes in order
        unsigned int k = 0;
        for (unsigned int wi = (n + 31) / 32; wi-- > 0;)
            for (unsigned int i = wi * 32; i < n && i < wi * 32 + 32; i++) L.order[k++] = &L.threads[i];
    } else if (order_mode == 2) {
        for (unsigned int i = n; i > 1; i--) {  // Fisher-Yates, xorshift64
            L.rng ^= L.rng << 13;
            L.rng ^= L.rng >> 7;
            L.rng ^= L.rng << 17;
            unsigned int j = (unsigned int)(L.rng % i);
            std::swap(L.order[i - 1], L.order[j]);
        }
    }
    for (unsigned int i = 0; i < n; i++) L.order[i]->pos = i;
}

// ---------------------------------------------------------------------------
// A segfault inside a launch still kills the process (as documented), but it
// first says where: kernel, block, thread, and whether it hit a fiber stack's
// guard page (stack overflow: raise LLMCU_EMU_STACK). Then the previous
// handler (Python's faulthandler, or the default) takes over.
struct sigaction g_old_segv, g_old_bus;
bool g_handler_installed = false;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    if (L.in_fiber && g_cur) {
        char buf[1024];
        uintptr_t a = (uintptr_t)info->si_addr, lo = (uintptr_t)L.stacks;
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        bool guard = L.stacks && a >= lo && a < lo + L.stacks_bytes && (a - lo) % L.stack_stride < page;
        int len;
        if (guard)
            len = snprintf(buf, sizeof buf,
                           "\nllmcu.emu: stack overflow in kernel %s, block (%u,%u,%u), %s: its %zu-byte fiber "
                           "stack is too small; raise it with LLMCU_EMU_STACK=256K (or more)\n",
                           L.kernel, emu_g_blockIdx.x, emu_g_blockIdx.y, emu_g_blockIdx.z, thread_name(g_cur),
                           L.stack_size);
        else
            len = snprintf(buf, sizeof buf,
                           "\nllmcu.emu: %s at address %p in kernel %s, block (%u,%u,%u), %s (an out-of-bounds "
                           "or host-invalid pointer? LLMCU_EMU_ASAN=1 names the line)\n",
                           sig == SIGBUS ? "bus error" : "segmentation fault", info->si_addr, L.kernel,
                           emu_g_blockIdx.x, emu_g_blockIdx.y, emu_g_blockIdx.z, thread_name(g_cur));
        if (len > 0) {
            ssize_t w = write(2, buf, (size_t)len < sizeof buf ? (size_t)len : sizeof buf - 1);
            (void)w;
        }
    }
    // Hand the fault to whoever handled it before; returning re-runs the
    // faulting instruction under that handler.
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    (void)uctx;
}

void install_fault_handler() {
    // The handler must run on an alternate stack: an overflowing fiber has none left.
    stack_t ss;
    if (sigaltstack(nullptr, &ss) == 0 && (ss.ss_flags & SS_DISABLE)) {
        static thread_local char* alt = nullptr;
        if (!alt) {
            size_t size = 64 * 1024;
            alt = (char*)malloc(size);
            if (alt) {
                stack_t ns;
                ns.ss_sp = alt;
                ns.ss_size = size;
                ns.ss_flags = 0;
                sigaltstack(&ns, nullptr);
            }
        }
    }
    if (g_handler_installed) return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &g_old_segv) == 0 && sigaction(SIGBUS, &sa, &g_old_bus) == 0)
        g_handler_installed = true;
}

}  // namespace

// ---------------------------------------------------------------------------
// Entry points used by shim.h

void* emu_dynamic_shared() { return L.dyn_shared; }

int emu_block_sync(int kind, int pred, const char* file, int line) {
    Thread* t = g_cur;
    BlockBarrier& b = L.bar;
    if (b.arrived == 0) {
        b.file = file;
        b.line = line;
    } else if (!same_site(b.file, b.line, file, line)) {
        fail("divergent barrier: %s reached %s at %s:%d while other threads wait at the barrier at %s:%d",
             thread_name(t), sync_name(kind), file, line, b.file, b.line);
    }
    int p = b.gen & 1;
    if (kind == EMU_SYNC_AND) b.acc[p] += !pred;  // count of false
    else b.acc[p] += pred;
    b.arrived++;
    if ((unsigned int)b.arrived == L.live) {
        release_block();
    } else {
        t->state = WAIT_BLOCK;
        t->file = file;
        t->line = line;
        t->what = sync_name(kind);
        switch_to_next(t);
    }
    int acc = b.acc[p];
    switch (kind) {
        case EMU_SYNC_COUNT: return acc;
        case EMU_SYNC_AND: return acc == 0;
        case EMU_SYNC_OR: return acc != 0;
    }
    return 0;
}

emu_warp_result emu_warp_exchange(int kind, unsigned int mask, unsigned long long value, const char* file,
                                  int line) {
    Thread* t = g_cur;
    Warp* w = t->warp;
    unsigned int bit = 1u << t->lane;
    if (!(mask & bit))
        fail("%s calls %s at %s:%d with mask 0x%08x, which does not include its own lane", thread_name(t),
             warp_name(kind), file, line, mask);
    if (w->arrived == 0) {
        w->mask = mask;
        w->kind = kind;
        w->file = file;
        w->line = line;
    } else if (w->mask != mask || w->kind != kind) {
        fail("divergent warp operation: %s reached %s at %s:%d (mask 0x%08x) while lanes 0x%08x of its warp wait in "
             "%s at %s:%d (mask 0x%08x)",
             thread_name(t), warp_name(kind), file, line, mask, w->arrived, warp_name(w->kind), w->file,
             w->line, w->mask);
    }
    int p = w->gen & 1;
    w->vals[p][t->lane] = value;
    w->written[p] |= bit;
    w->arrived |= bit;
    if (warp_complete(w)) {
        release_warp(w);
    } else {
        t->state = WAIT_WARP;
        t->file = file;
        t->line = line;
        t->what = warp_name(kind);
        switch_to_next(t);
    }
    return emu_warp_result{w->vals[p], w->written[p], t->lane};
}

void emu_bad_lane(const char* op, int src, const char* file, int line) {
    Thread* t = g_cur;
    Warp* w = t->warp;
    const char* why = !((w->present >> src) & 1u) ? "does not exist (partial warp)"
                      : ((w->exited >> src) & 1u) ? "has exited"
                      : !((w->mask >> src) & 1u)  ? "is not in the mask"
                                                  : "did not take part";
    fail("%s: %s at %s:%d reads lane %d, which %s (mask 0x%08x); CUDA leaves that value undefined",
         thread_name(t), op, file, line, src, why, w->mask);
}

void emu_device_assert(const char* expr, const char* file, int line) {
    fail("%s: device assertion `%s` failed at %s:%d", thread_name(g_cur), expr, file, line);
}

// cp.async, as CUDA's pipeline primitives (shim.h: __pipeline_memcpy_async ...) and PTX's cp.async
// issue, commit_group and wait_group. On the GPU a copy lands in shared memory at some
// moment between its issue and the wait that covers it. "late" (the default) takes both
// ends of that window at once: the destination is poisoned (0xFF: NaN in bf16 and fp32)
// when the copy is issued and gets the data only at the wait, so a read before the wait
// (or before the barrier after it, in the warp-serial orders) sees NaN, and so does a
// warp still reading a buffer that another warp has begun to refill. "eager" copies at
// issue, as the emulator did before it modelled cp.async.
namespace {
// 0: not shared memory; 1: this block's dynamic or (static_known) static shared memory;
// 2: unknown (a static in a build whose statics are not in the emu_shared section).
int shared_kind(const void* p, size_t bytes, int static_known) {
    uintptr_t a = (uintptr_t)p;
    uintptr_t d0 = (uintptr_t)L.dyn_shared, d1 = d0 + L.dyn_size;
    if (a >= d0 && a + bytes <= d1) return 1;
    if (!static_known) return 2;
    uintptr_t s0 = (uintptr_t)__start_emu_shared, s1 = (uintptr_t)__stop_emu_shared;
    uintptr_t t0 = (uintptr_t)__start_emu_shared_t, t1 = (uintptr_t)__stop_emu_shared_t;
    return ((s0 != s1 && a >= s0 && a + bytes <= s1) || (t0 != t1 && a >= t0 && a + bytes <= t1)) ? 1 : 0;
}
}  // namespace

void emu_check_shared(const void* p, size_t bytes, size_t align, int static_known, const char* what,
                      const char* file, int line) {
    if ((uintptr_t)p % align != 0)
        fail("%s: %s at %s:%d: address %p is not %zu-byte aligned (a misaligned-address fault on a GPU)",
             thread_name(g_cur), what, file, line, p, align);
    if (shared_kind(p, bytes, static_known) == 0)
        fail("%s: %s at %s:%d: address %p (%zu bytes) is not in the block's shared memory", thread_name(g_cur),
             what, file, line, p, bytes);
}

void emu_cp_async(void* dst, const void* src, size_t bytes, size_t zfill, int static_known) {
    Thread* t = g_cur;
    if (bytes != 4 && bytes != 8 && bytes != 16)
        fail("%s: cp.async of %zu bytes: the size must be 4, 8 or 16", thread_name(t), bytes);
    if (zfill > bytes) fail("%s: cp.async zero-fills %zu of %zu bytes", thread_name(t), zfill, bytes);
    if ((uintptr_t)dst % bytes != 0 || (uintptr_t)src % bytes != 0)
        fail("%s: cp.async of %zu bytes needs %zu-byte aligned addresses, got dst %p src %p", thread_name(t),
             bytes, bytes, dst, src);
    if (shared_kind(dst, bytes, static_known) == 0)
        fail("%s: cp.async destination %p is not in the block's shared memory", thread_name(t), dst);
    if (shared_kind(src, bytes, static_known) == 1)
        fail("%s: cp.async source %p is in shared memory; it must be global memory", thread_name(t), src);
    unsigned char data[16];
    memcpy(data, src, bytes - zfill);
    memset(data + (bytes - zfill), 0, zfill);
    if (!L.cp_late) {
        memcpy(dst, data, bytes);
        return;
    }
    if (t->cp_count == EMU_CP_MAX)
        fail("%s: more than %d cp.async copies in flight (missing waits?)", thread_name(t), (int)EMU_CP_MAX);
    CpAsync& c = L.cp_pending[t->linear][t->cp_count++];
    c.dst = dst;
    memcpy(c.data, data, bytes);
    c.bytes = (unsigned int)bytes;
    c.group = t->cp_group;
    memset(dst, 0xff, bytes);
}

void emu_cp_async_commit() { g_cur->cp_group++; }

void emu_cp_async_wait(size_t prior) {
    // Every committed group but the newest `prior` lands, in issue order; copies not yet
    // committed stay in flight (as PTX's wait_group: it covers committed groups only).
    Thread* t = g_cur;
    CpAsync* p = L.cp_pending[t->linear];
    unsigned int kept = 0;
    for (unsigned int i = 0; i < t->cp_count; i++) {
        if ((size_t)p[i].group + prior < t->cp_group) memcpy(p[i].dst, p[i].data, p[i].bytes);
        else p[kept++] = p[i];
    }
    t->cp_count = kept;
}

unsigned int emu_active_mask() {
    Warp* w = g_cur->warp;
    return w->present & ~w->exited;
}

int emu_launch(const char* name, const emu_dim3* grid, const emu_dim3* block, size_t shmem, void** args,
               emu_body_fn body) {
    L.kernel = name;
    L.failed = false;
    L.error[0] = 0;
    emu_g_blockIdx = uint3{0, 0, 0};
    unsigned long long n64 = (unsigned long long)block->x * block->y * block->z;
    if (n64 == 0 || n64 > 1024 || grid->x == 0 || grid->y == 0 || grid->z == 0) {
        L.failed = true;
        snprintf(L.error, sizeof L.error, "kernel %s: bad launch configuration (grid and block dims must be > 0, "
                 "at most 1024 threads per block)", name);
        return 1;
    }
    unsigned int n = (unsigned int)n64;
    if (n > L.cap) {
        free(L.threads);
        free(L.warps);
        free(L.order);
        free(L.cp_pending);
        L.cap = (n + 31) / 32 * 32;
        L.threads = (Thread*)calloc(L.cap, sizeof(Thread));
        L.warps = (Warp*)calloc(L.cap / 32, sizeof(Warp));
        L.order = (Thread**)calloc(L.cap, sizeof(Thread*));
        L.cp_pending = (CpAsync(*)[EMU_CP_MAX])calloc(L.cap, sizeof *L.cp_pending);
    }
    size_t dyn = shmem ? shmem : 1;
    if (dyn > L.dyn_cap) {
        free(L.dyn_shared);
        L.dyn_shared = (unsigned char*)malloc(dyn);
        L.dyn_cap = dyn;
    }
    L.dyn_size = dyn;
    if (!L.threads || !L.warps || !L.order || !L.cp_pending || !L.dyn_shared || !ensure_stacks(n, env_stack_size())) {
        L.failed = true;
        snprintf(L.error, sizeof L.error, "kernel %s: out of memory for %u fibers (%s)", name, n, strerror(errno));
        L.cap = 0;
        L.dyn_cap = 0;
        return 1;
    }
    install_fault_handler();
    const char* ord = getenv("LLMCU_EMU_ORDER");
    unsigned int order_mode = 0;
    if (ord && strcmp(ord, "reverse") == 0) order_mode = 1;
    else if (ord && strcmp(ord, "random") == 0) order_mode = 2;
    else if (ord && strcmp(ord, "warps") == 0) order_mode = 3;
    else if (ord && strcmp(ord, "warps-reverse") == 0) order_mode = 4;
    else if (ord && *ord && strcmp(ord, "forward") != 0) {
        L.failed = true;
        snprintf(L.error, sizeof L.error, "kernel %s: LLMCU_EMU_ORDER must be forward, reverse, random, warps "
                 "or warps-reverse, got '%.64s'", name, ord);
        return 1;
    }
    L.warp_serial = order_mode >= 3;
    const char* cp = getenv("LLMCU_EMU_CP_ASYNC");
    if (cp && *cp && strcmp(cp, "late") != 0 && strcmp(cp, "eager") != 0) {
        L.failed = true;
        snprintf(L.error, sizeof L.error, "kernel %s: LLMCU_EMU_CP_ASYNC must be late or eager, got '%.64s'",
                 name, cp);
        return 1;
    }
    L.cp_late = !(cp && strcmp(cp, "eager") == 0);

    L.body = body;
    L.args = args;
    L.n = n;
    emu_g_blockDim = dim3(block->x, block->y, block->z);
    emu_g_gridDim = dim3(grid->x, grid->y, grid->z);
    for (unsigned int i = 0; i < n; i++) {
        Thread& t = L.threads[i];
        t.tid = uint3{i % block->x, (i / block->x) % block->y, i / (block->x * block->y)};
        t.linear = i;
        t.lane = i % 32;
        t.warp = &L.warps[i / 32];
        t.warp->lanes[t.lane] = &t;
        t.stack_lo = L.stacks + i * L.stack_stride + (L.stack_stride - L.stack_size);
        // Offset each top by a different multiple of 64 bytes so the stacks
        // (a page multiple apart) do not all map to the same cache sets.
        t.stack_top = L.stacks + (i + 1) * L.stack_stride - 64 * (i % 61) - 64;
    }
    size_t shared_bytes = (size_t)((uintptr_t)&__stop_emu_shared[0] - (uintptr_t)&__start_emu_shared[0]);
    size_t shared_t_bytes = (size_t)((uintptr_t)&__stop_emu_shared_t[0] - (uintptr_t)&__start_emu_shared_t[0]);
    for (unsigned int bz = 0; bz < grid->z && !L.failed; bz++)
        for (unsigned int by = 0; by < grid->y && !L.failed; by++)
            for (unsigned int bx = 0; bx < grid->x && !L.failed; bx++) {
                emu_g_blockIdx = uint3{bx, by, bz};
                memset(L.dyn_shared, 0xff, L.dyn_size);  // unwritten reads give NaN
                if (shared_bytes) memset(__start_emu_shared, 0xff, shared_bytes);
                if (shared_t_bytes) memset(__start_emu_shared_t, 0xff, shared_t_bytes);
                start_block(order_mode);
                Thread* first = L.order[0];
                set_current(first);
                L.in_fiber = true;
                L.switches++;
                ctx_switch(&L.main, &first->ctx);
                L.in_fiber = false;
            }
    fflush(stdout);
    return L.failed ? 1 : 0;
}

extern "C" __attribute__((visibility("default"))) const char* emu_last_error() { return L.error; }
extern "C" __attribute__((visibility("default"))) unsigned long long emu_switch_count() { return L.switches; }
extern "C" __attribute__((visibility("default"))) const char* emu_switch_kind() { return EMU_SWITCH; }
