/* gilprobe: how long each thread of a process waits on condition variables, the GIL's apart.
 *
 * An LD_PRELOAD library (benchmarks/gilprobe.py builds it with gcc and reads what it publishes). It
 * interposes pthread_cond_timedwait and pthread_cond_wait, times every call with CLOCK_MONOTONIC, and adds
 * the time to the calling thread's slot in a small shared file, $GILPROBE_DIR/gilprobe-<pid> (default
 * directory /dev/shm), one file per process, made at load and again in a forked child. A reader maps the
 * file and takes deltas between two reads; nothing in the probed process ever waits for a reader.
 *
 * CPython (3.11 to 3.13) waits for the GIL on a condition variable that lives inside the runtime's static
 * state (the symbol _PyRuntime): take_gil() waits on gil->cond with pthread_cond_timedwait (in slices of
 * the switch interval), and drop_gil(), when another thread asked for the GIL, waits on gil->switch_cond
 * with pthread_cond_wait until that thread has actually taken it (FORCE_SWITCHING). A wait on a condition
 * variable inside _PyRuntime is counted as a GIL wait of its kind; every other wait (torch, gRPC, ...) as
 * "other". Each kind keeps calls, total ns, calls that timed out, and a histogram of call durations:
 * bucket 0 < 1 us, bucket b in [2^(b-1), 2^b) us.
 *
 * Layout (little-endian, all fields 8-byte aligned; benchmarks/gilprobe.py mirrors it):
 *   header: u64 magic, u32 version, u32 max_slots, u32 used_slots, u32 slot_bytes, i32 pid, u32 lost_threads
 *   slot[max_slots]: i32 tid, u32 pad, then per kind (take, switch, other): u64 calls, u64 ns, u64 timeouts,
 *                    u64 hist[GP_BUCKETS]
 * Each slot is written by its own thread only (plain 8-byte stores: a reader sees every field whole).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define GP_MAGIC 0x31424f5250504c47ULL /* "GLPPROB1" */
#define GP_VERSION 1
#define GP_MAX_SLOTS 256
#define GP_BUCKETS 32
#define GP_KINDS 3 /* 0: GIL take (timed), 1: GIL forced switch (untimed), 2: any other condvar wait */

struct gp_kind {
    uint64_t calls, ns, timeouts;
    uint64_t hist[GP_BUCKETS];
};

struct gp_slot {
    int32_t tid;
    uint32_t pad;
    struct gp_kind kind[GP_KINDS];
};

struct gp_header {
    uint64_t magic;
    uint32_t version, max_slots;
    uint32_t used_slots, slot_bytes;
    int32_t pid;
    uint32_t lost_threads;
};

typedef int (*timedwait_fn)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);
typedef int (*wait_fn)(pthread_cond_t *, pthread_mutex_t *);

static timedwait_fn real_timedwait;
static wait_fn real_wait;
static struct gp_header *shared;          /* NULL: not publishing (the waits still pass through) */
static unsigned generation = 1;           /* bumped in a forked child: every thread takes a new slot */
static uintptr_t runtime_lo, runtime_hi;  /* _PyRuntime's extent, once found */
static __thread struct gp_slot *my_slot;
static __thread unsigned my_generation;

static void resolve(void) {
    /* The versioned names: plain dlsym may hand back glibc's pre-2.3.2 compatibility condvars. */
    if (!real_timedwait) {
        real_timedwait = (timedwait_fn)dlvsym(RTLD_NEXT, "pthread_cond_timedwait", "GLIBC_2.3.2");
        if (!real_timedwait) real_timedwait = (timedwait_fn)dlsym(RTLD_NEXT, "pthread_cond_timedwait");
    }
    if (!real_wait) {
        real_wait = (wait_fn)dlvsym(RTLD_NEXT, "pthread_cond_wait", "GLIBC_2.3.2");
        if (!real_wait) real_wait = (wait_fn)dlsym(RTLD_NEXT, "pthread_cond_wait");
    }
}

static void find_runtime(void) {
    if (runtime_hi) return;
    void *addr = dlsym(RTLD_DEFAULT, "_PyRuntime");
    if (!addr) return;
    Dl_info info;
    const ElfW(Sym) *sym = NULL;
    if (dladdr1(addr, &info, (void **)&sym, RTLD_DL_SYMENT) && sym && sym->st_size) {
        runtime_lo = (uintptr_t)addr;
        runtime_hi = runtime_lo + sym->st_size;
    }
}

static void publish(void) {
    const char *dir = getenv("GILPROBE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/gilprobe-%d", dir && *dir ? dir : "/dev/shm", (int)getpid());
    size_t bytes = sizeof(struct gp_header) + (size_t)GP_MAX_SLOTS * sizeof(struct gp_slot);
    shared = NULL;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (ftruncate(fd, (off_t)bytes) == 0) {
        void *map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map != MAP_FAILED) {
            struct gp_header *h = map;
            h->version = GP_VERSION;
            h->max_slots = GP_MAX_SLOTS;
            h->slot_bytes = sizeof(struct gp_slot);
            h->pid = (int32_t)getpid();
            __atomic_store_n(&h->magic, GP_MAGIC, __ATOMIC_RELEASE);
            shared = h;
        }
    }
    close(fd);
}

static void after_fork_in_child(void) {
    generation++;
    publish();
}

__attribute__((constructor)) static void gilprobe_init(void) {
    resolve();
    find_runtime();
    publish();
    pthread_atfork(NULL, NULL, after_fork_in_child);
}

static struct gp_slot *slot(void) {
    if (my_generation == generation) return my_slot;
    my_generation = generation;
    my_slot = NULL;
    struct gp_header *h = shared;
    if (!h) return NULL;
    find_runtime(); /* an interpreter loaded after this library (dlopen'd libpython) is found here */
    uint32_t i = __atomic_fetch_add(&h->used_slots, 1, __ATOMIC_RELAXED);
    if (i >= h->max_slots) {
        __atomic_fetch_add(&h->lost_threads, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    struct gp_slot *s = (struct gp_slot *)((char *)(h + 1) + (size_t)i * sizeof(struct gp_slot));
    __atomic_store_n(&s->tid, (int32_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
    my_slot = s;
    return s;
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline void add(uint64_t *field, uint64_t n) {
    __atomic_store_n(field, __atomic_load_n(field, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

static void account(pthread_cond_t *cond, int timed, uint64_t ns, int rc) {
    struct gp_slot *s = slot();
    if (!s) return;
    uintptr_t c = (uintptr_t)cond;
    int k = (c >= runtime_lo && c < runtime_hi) ? (timed ? 0 : 1) : 2;
    struct gp_kind *kind = &s->kind[k];
    uint64_t us = ns / 1000;
    int b = us ? 64 - __builtin_clzll(us) : 0;
    if (b >= GP_BUCKETS) b = GP_BUCKETS - 1;
    add(&kind->calls, 1);
    add(&kind->ns, ns);
    if (rc == ETIMEDOUT) add(&kind->timeouts, 1);
    add(&kind->hist[b], 1);
}

int pthread_cond_timedwait(pthread_cond_t *cond, pthread_mutex_t *mutex, const struct timespec *abstime) {
    if (!real_timedwait) resolve();
    uint64_t start = now_ns();
    int rc = real_timedwait(cond, mutex, abstime);
    int saved = errno;
    account(cond, 1, now_ns() - start, rc);
    errno = saved;
    return rc;
}

int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex) {
    if (!real_wait) resolve();
    uint64_t start = now_ns();
    int rc = real_wait(cond, mutex);
    int saved = errno;
    account(cond, 0, now_ns() - start, rc);
    errno = saved;
    return rc;
}
