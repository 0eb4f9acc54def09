/* freed_guard: catch writes into freed small heap blocks (#30.1), for LD_PRELOAD.
 *
 * The worker crashes of #30.1 are glibc finding a corrupt free-list pointer in a thread's
 * tcache: a small block was written after it had been freed. glibc finds that long after
 * the write, and only when the write lands in the few blocks a tcache holds at that
 * moment. This library makes the window far larger: every free() of a small block (usable
 * size <= FREED_GUARD_MAX bytes, default 24: the bin of the crashes) fills the block with a
 * fixed pattern and keeps it out of glibc for the next FREED_GUARD_SLOTS such frees
 * (default 2^18) or until the quarantine holds FREED_GUARD_BYTES (default 64 MiB),
 * remembering which thread freed it and the freeing call stack. realloc() that moves a small
 * block frees it the same way. When a block
 * leaves that quarantine, its bytes are compared with the pattern: a difference is a write
 * after free, reported with the freeing stack and the bytes written (the written value
 * often names its writer: a pointer into a library, a refcount, a flag). A block freed again
 * while still in quarantine is reported as a double free, with both stacks.
 *
 * Reports go to FREED_GUARD_DIR (default /tmp/freed_guard), one file per process:
 * PID.log (its first line says the guard is active; each report starts with "== "), plus
 * PID.maps (the process's mappings at its latest report, to place the addresses). Build: gcc -O2 -shared -fPIC -o freed_guard.so freed_guard.c
 * Use:   LD_PRELOAD=/path/freed_guard.so python ...   (bench/crash_loop.py --guard)
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

extern void __libc_free(void *);
extern void *__libc_malloc(size_t);
extern void *__libc_realloc(void *, size_t);

#define DEPTH 12
#define PATTERN 0xA5

struct slot {
    void *p;
    uint32_t usable;
    int32_t tid;
    uint32_t ms;                   /* when freed: ms since the guard started */
    char thread[16];
    int nframes;
    void *frames[DEPTH];
};

/* The quarantine: a FIFO ring of slots, oldest at tail, next free slot at head. */
static struct slot *ring;
static size_t nslots, head, tail, max_usable = 24, held_bytes, max_bytes = 64u << 20;
static volatile int ring_lock;
static char dir[256] = "/tmp/freed_guard";
static int log_fd = -1;
static unsigned long reports, evicted;
static struct timespec started;
static __thread int busy;          /* inside our own code: pass straight to glibc */
static __thread int32_t my_tid;
static __thread char my_name[16];
static __thread unsigned name_age;

static void lock(void) { while (__atomic_exchange_n(&ring_lock, 1, __ATOMIC_ACQUIRE)) ; }
static void unlock(void) { __atomic_store_n(&ring_lock, 0, __ATOMIC_RELEASE); }
static void reset_after_fork(void) { ring_lock = 0; log_fd = -1; my_tid = 0; }

static void say(const char *s) { if (log_fd >= 0) (void)!write(log_fd, s, strlen(s)); }

static void copy_maps(void) {
    char path[300], buf[4096];
    snprintf(path, sizeof path, "%s/%d.maps", dir, (int)getpid());
    int in = open("/proc/self/maps", O_RDONLY), out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ssize_t n;
    while (in >= 0 && out >= 0 && (n = read(in, buf, sizeof buf)) > 0) (void)!write(out, buf, n);
    if (in >= 0) close(in);
    if (out >= 0) close(out);
}

static void open_log(void) {
    if (log_fd >= 0) return;
    char path[300];
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/%d.log", dir, (int)getpid());
    log_fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
}

static void report_slot(const char *what, const struct slot *s) {
    char line[256];
    snprintf(line, sizeof line, "%s: block %p (%u usable bytes) freed by tid %d [%s] at:\n",
             what, s->p, s->usable, s->tid, s->thread);
    say(line);
    backtrace_symbols_fd((void *const *)s->frames, s->nframes, log_fd);
}

static void report_write(const struct slot *s) {
    open_log();
    copy_maps();
    char line[256];
    snprintf(line, sizeof line, "\n== write after free #%lu in pid %d\n", ++reports, (int)getpid());
    say(line);
    report_slot("freed", s);
    const unsigned char *b = s->p;
    for (uint32_t off = 0; off + 8 <= s->usable; off += 8) {
        uint64_t w;
        memcpy(&w, b + off, 8);
        if (w == 0xA5A5A5A5A5A5A5A5ull && s->usable > 64) continue;   /* long blocks: changes only */
        snprintf(line, sizeof line, "  +%02u: %016llx%s\n", off, (unsigned long long)w,
                 w == 0xA5A5A5A5A5A5A5A5ull ? "" : "   <- written");
        say(line);
    }
}

static void report_double_free(const struct slot *s, void *const *frames, int n) {
    open_log();
    copy_maps();
    char line[256];
    snprintf(line, sizeof line, "\n== double free #%lu in pid %d: freed again by tid %d [%s] at:\n",
             ++reports, (int)getpid(), my_tid, my_name);
    say(line);
    backtrace_symbols_fd(frames, n, log_fd);
    report_slot("first freed", s);
}

static int intact(const struct slot *s) {
    const unsigned char *b = s->p;
    for (uint32_t i = 0; i < s->usable; i++)
        if (b[i] != PATTERN) return 0;
    return 1;
}

__attribute__((constructor)) static void init(void) {
    const char *v;
    clock_gettime(CLOCK_MONOTONIC, &started);
    nslots = 1u << 18;
    if ((v = getenv("FREED_GUARD_SLOTS"))) nslots = strtoul(v, NULL, 10);
    if ((v = getenv("FREED_GUARD_MAX"))) max_usable = strtoul(v, NULL, 10);
    if ((v = getenv("FREED_GUARD_BYTES"))) max_bytes = strtoul(v, NULL, 10);
    if ((v = getenv("FREED_GUARD_DIR"))) snprintf(dir, sizeof dir, "%s", v);
    ring = mmap(NULL, nslots * sizeof *ring, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ring == MAP_FAILED) ring = NULL;
    void *warm[2];
    busy = 1;
    backtrace(warm, 2);            /* loads libgcc_s now, not inside a later free */
    busy = 0;
    pthread_atfork(NULL, NULL, reset_after_fork);
    open_log();     /* one line per guarded process: proof that the guard was loaded */
    char line[200];
    snprintf(line, sizeof line, "freed_guard active in pid %d: %zu slots, %zu bytes, blocks <= %zu bytes\n",
             (int)getpid(), nslots, max_bytes, max_usable);
    say(line);
}

static uint32_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint32_t)((t.tv_sec - started.tv_sec) * 1000 + (t.tv_nsec - started.tv_nsec) / 1000000);
}

/* Each time as many blocks as the ring holds have left quarantine: how long the latest had
 * been there, the window in which a write after free is caught. */
static void note_window(const struct slot *s) {
    if (++evicted % nslots) return;
    open_log();
    char line[160];
    snprintf(line, sizeof line, "window: %lu blocks out of quarantine; the latest after %u ms\n",
             evicted, now_ms() - s->ms);
    say(line);
}

static void note_thread(void) {
    if (!my_tid) my_tid = (int32_t)syscall(SYS_gettid);
    if (name_age++ % 4096 == 0) prctl(PR_GET_NAME, my_name, 0, 0, 0);
}

/* Already quarantined? Then this is a second free. Looks through the whole ring, so it is
 * called only for blocks that hold the pattern from end to end (rare for a live block).
 * Called with the lock held. */
static int quarantined(void *p, struct slot *found) {
    for (size_t i = tail; i < head; i++)
        if (ring[i % nslots].p == p) { *found = ring[i % nslots]; return 1; }
    return 0;
}

/* Take a small block into quarantine; hand back to glibc the oldest ones that must leave,
 * each checked first. The double-free check, the fill and the insertion happen under one
 * lock: two threads freeing the same block at once (the race of #30.1) must not both pass
 * the check and put it in the ring twice, or the guard would hand it to glibc twice. */
static void quarantine(void *p, size_t usable) {
    note_thread();
    struct slot s = {.p = p, .usable = (uint32_t)usable, .tid = my_tid, .ms = now_ms()};
    memcpy(s.thread, my_name, sizeof s.thread);
    s.nframes = backtrace(s.frames, DEPTH);
    struct slot first, out[2];
    int n = 0, twice;
    lock();
    twice = intact(&s) && quarantined(p, &first);
    if (!twice) {
        memset(p, PATTERN, usable);
        if (head - tail == nslots) out[n++] = ring[tail++ % nslots];
        ring[head++ % nslots] = s;
        held_bytes += usable;
        if (held_bytes > max_bytes && head - tail > 1) out[n++] = ring[tail++ % nslots];
        for (int i = 0; i < n; i++) held_bytes -= out[i].usable;
    }
    unlock();
    if (twice) {
        report_double_free(&first, s.frames, s.nframes);
        return;     /* never hand it to glibc twice */
    }
    for (int i = 0; i < n; i++) {
        if (!intact(&out[i])) report_write(&out[i]);
        note_window(&out[i]);
        __libc_free(out[i].p);
    }
}

/* At a normal exit, the blocks still in quarantine are checked too. */
__attribute__((destructor)) static void check_all(void) {
    if (!ring) return;
    busy = 1;
    lock();
    for (size_t i = tail; i < head; i++)
        if (!intact(&ring[i % nslots])) report_write(&ring[i % nslots]);
    unlock();
}

void free(void *p) {
    if (!p) return;
    if (busy || !ring) { __libc_free(p); return; }
    size_t usable = malloc_usable_size(p);
    if (usable > max_usable) { __libc_free(p); return; }
    busy = 1;
    quarantine(p, usable);
    busy = 0;
}

/* A small block that realloc moves is freed through the quarantine as well. */
void *realloc(void *p, size_t n) {
    if (!p || busy || !ring) return __libc_realloc(p, n);
    size_t usable = malloc_usable_size(p);
    if (usable > max_usable) return __libc_realloc(p, n);
    if (n == 0) { free(p); return NULL; }
    if (n <= usable) return p;
    void *q = __libc_malloc(n);
    if (!q) return NULL;
    memcpy(q, p, usable);
    free(p);
    return q;
}
