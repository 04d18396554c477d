/* The step launcher: what a ready sandbox process (spawn/ready.py) execs into once the
 * work made ahead is done, so that the process that becomes the step holds a few pages
 * instead of a copy of the supervisor's Python (an execve frees every page of the old
 * address space; from a forked Python that is about 1 ms).
 *
 * It says "ready" on fd 3, receives one message there (a list of syscalls, the data they
 * point into, and the job's fds), runs the syscalls in order and ends in execve. The
 * message is built by spawn/launcher_program.py, which documents its layout; this file
 * only carries it out. A failing syscall is reported on the error pipe as the Python steps
 * report one ("label\0errno\0path"), then the launcher exits with 127.
 *
 * Built by scripts/build-launcher.sh (static, no libc); linux/launcher.py holds the result.
 */

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef int i32;

#define SYS_write 1
#define SYS_close 3
#define SYS_fcntl 72
#define SYS_execve 59
#define SYS_exit 60
#define SYS_recvmsg 47
#define SYS_prctl 157
#define SYS_sendto 44
#define MSG_NOSIGNAL 0x4000

#define ENOENT 2
#define EINTR 4
#define E2BIG 7
#define EACCES 13
#define ENOTDIR 20
#define EINVAL 22

#define MAGIC 0x78656331u /* "1cex" */
#define OP_JUMP -1
#define OP_EXECVP -2
#define OP_FAIL -3
#define OP_DROP_BOUNDING -4 /* prctl(PR_CAPBSET_DROP, cap) for cap 0..arg0, errors skipped */
#define ANY_ERRNO -1
#define MSG_CMSG_CLOEXEC 0x40000000
#define MSG_TRUNC 0x20
#define MSG_CTRUNC 0x8
#define MAX_FDS 64
#define BUFFER_SIZE (1 << 20)

struct op {
    i64 nr;            /* a syscall number, or OP_* */
    u64 arg[6];
    u32 load[6];       /* nonzero: the argument is the u64 at this offset, read when run */
    u32 store[4];      /* offsets where the result is written (0: nowhere) */
    i32 branch_errno;  /* failing with this errno (ANY_ERRNO: any) goes on at target */
    i32 target;
    u32 label;         /* offsets of the report's texts */
    u32 path;
};

/* Offsets: of the sections from the start of the message; inside an op (text, load,
 * store, report) from the start of the data; a relocation names a u64 in the ops, or
 * with IN_DATA set, in the data. */
struct header {
    u32 magic, nops, ops, data, nptrs, ptrs, nfds, fds, report, reserved;
};
#define IN_DATA 0x80000000u

struct iovec { void *base; u64 len; };
struct msghdr {
    void *name; u32 namelen; u32 pad0; struct iovec *iov; u64 iovlen;
    void *control; u64 controllen; i32 flags; i32 pad1;
};
struct cmsghdr { u64 len; i32 level; i32 type; };

static char buffer[BUFFER_SIZE] __attribute__((aligned(16)));
static char *data;   /* the message's data section */
static u32 report;   /* where in it the error pipe's fd is kept */
static u64 control[(16 + MAX_FDS * 4) / 8 + 1];

/* The compiler may call these for struct copies and zeroing; there is no libc. */
void *memset(void *to, int byte, u64 size)
{
    char *p = to;
    while (size--)
        *p++ = (char)byte;
    return to;
}

void *memcpy(void *to, const void *from, u64 size)
{
    char *p = to;
    const char *q = from;
    while (size--)
        *p++ = *q++;
    return to;
}

static i64 sys6(i64 n, u64 a, u64 b, u64 c, u64 d, u64 e, u64 f)
{
    register u64 r10 __asm__("r10") = d;
    register u64 r8 __asm__("r8") = e;
    register u64 r9 __asm__("r9") = f;
    i64 ret;
    __asm__ volatile("syscall" : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

#define sys3(n, a, b, c) sys6((n), (u64)(a), (u64)(b), (u64)(c), 0, 0, 0)

static __attribute__((noreturn)) void leave(int code)
{
    for (;;)
        sys3(SYS_exit, code, 0, 0);
}

static u64 put(char *out, u64 at, const char *text, u64 room)
{
    while (*text && at < room)
        out[at++] = *text++;
    return at;
}

/* "label\0errno\0path" on the error pipe, then exit: the supervisor reads it as it reads
 * a Python step's report. */
static __attribute__((noreturn)) void fail(const char *label, i64 err, const char *path)
{
    static char out[8192];
    char digits[24];
    int n = 0;
    u64 at = put(out, 0, label, sizeof out - 32);
    out[at++] = 0;
    do {
        digits[n++] = (char)('0' + err % 10);
        err /= 10;
    } while (err && n < 20);
    while (n)
        out[at++] = digits[--n];
    out[at++] = 0;
    at = put(out, at, path, sizeof out);
    sys3(SYS_write, *(u64 *)(data + report), out, at);
    leave(127);
}

/* A message the launcher cannot read: said on the error pipe it started with. */
static __attribute__((noreturn)) void reject(void)
{
    static const char out[] = "step launcher\0" "22\0" "malformed program";
    sys3(SYS_write, 4, out, sizeof out - 1);
    leave(126);
}

static const char *text(u32 offset)
{
    return offset ? data + offset : "";
}

/* execve with execvp's search: ENOENT and ENOTDIR try the next directory, EACCES is
 * remembered (the last one is reported if nothing runs), anything else is reported. */
static __attribute__((noreturn)) void execvp(const struct op *op)
{
    char **argv = (char **)op->arg[0], **envp = (char **)op->arg[1];
    char **candidate = (char **)op->arg[2];
    const char *denied = 0;
    for (; *candidate; candidate++) {
        i64 err = -sys3(SYS_execve, *candidate, argv, envp);
        if (op->arg[4])
            fail(text(op->label), err, *candidate);
        if (err == ENOENT || err == ENOTDIR)
            continue;
        if (err == EACCES) {
            denied = *candidate;
            continue;
        }
        fail(text(op->label), err, *candidate);
    }
    if (denied)
        fail(text(op->label), EACCES, denied);
    fail(text(op->label), ENOENT, (const char *)op->arg[3]);
}

static int inside(u64 offset, u64 size, u64 length)
{
    return offset <= length && size <= length - offset;
}

/* The u64 a relocation names, or 0 if it lies outside the message. */
static u64 *field(const struct header *h, u32 at, u64 length)
{
    u64 offset = (at & IN_DATA) ? (u64)h->data + (at & ~IN_DATA) : (u64)h->ops + at;
    return inside(offset, 8, length) ? (u64 *)(buffer + offset) : 0;
}

static void run(u64 length, const i32 *fds, u32 nfds)
{
    const struct header *h = (const struct header *)buffer;
    if (length < sizeof *h || h->magic != MAGIC || h->data > length
        || !inside(h->ops, (u64)h->nops * sizeof(struct op), length)
        || !inside(h->ptrs, (u64)h->nptrs * 4, length)
        || !inside(h->fds, (u64)h->nfds * 4, length))
        reject();
    data = buffer + h->data;
    u64 room = length - h->data; /* the data section and what follows it */
    if (!inside(h->report, 8, room))
        reject();
    report = h->report;
    const u32 *ptrs = (const u32 *)(buffer + h->ptrs), *fdrefs = (const u32 *)(buffer + h->fds);
    for (u32 i = 0; i < h->nptrs; i++) {
        u64 *at = field(h, ptrs[i], length);
        if (!at || *at >= room)
            reject();
        *at += (u64)data;
    }
    for (u32 i = 0; i < h->nfds; i++) {
        u64 *at = field(h, fdrefs[i], length);
        if (!at || *at >= nfds)
            reject();
        *at = (u64)(i64)fds[*at];
    }
    struct op *ops = (struct op *)(buffer + h->ops);
    for (u32 i = 0; i < h->nops;) {
        const struct op *op = &ops[i];
        if (op->nr == OP_JUMP) {
            i = (u32)op->target;
            continue;
        }
        if (op->nr == OP_FAIL)
            fail(text(op->label), (i64)op->arg[0], text(op->path));
        if (op->nr == OP_EXECVP)
            execvp(op);
        if (op->nr == OP_DROP_BOUNDING) {
            for (u64 cap = 0; cap <= op->arg[0] && cap < 64; cap++)
                sys3(SYS_prctl, 24, cap, 0);
            i++;
            continue;
        }
        u64 arg[6];
        for (int k = 0; k < 6; k++)
            arg[k] = op->load[k] && inside(op->load[k], 8, room)
                         ? *(u64 *)(data + op->load[k]) : op->arg[k];
        i64 result = sys6(op->nr, arg[0], arg[1], arg[2], arg[3], arg[4], arg[5]);
        if (result < 0 && result > -4096) {
            if (op->branch_errno == ANY_ERRNO || op->branch_errno == -result) {
                i = (u32)op->target;
                continue;
            }
            fail(text(op->label), -result, text(op->path));
        }
        for (int k = 0; k < 4; k++)
            if (op->store[k] && inside(op->store[k], 8, room))
                *(u64 *)(data + op->store[k]) = (u64)result;
        i++;
    }
    fail("execve", EINVAL, "the launcher's program ended without execve");
}

void launcher_main(void)
{
    sys3(SYS_prctl, 15, "execbox-step", 0); /* PR_SET_NAME */
    sys3(SYS_fcntl, 4, 2, 1);               /* the error pipe: F_SETFD FD_CLOEXEC */
    if (sys6(SYS_sendto, 3, (u64) "ready", 5, MSG_NOSIGNAL, 0, 0) != 5)
        leave(0);                           /* the supervisor dropped us already */
    struct iovec iov = {buffer, sizeof buffer};
    struct msghdr message = {0};
    message.iov = &iov;
    message.iovlen = 1;
    message.control = control;
    message.controllen = sizeof control;
    i64 length;
    do
        length = sys3(SYS_recvmsg, 3, &message, MSG_CMSG_CLOEXEC);
    while (length == -EINTR);
    if (length <= 0)
        leave(0);                           /* dropped: no job */
    sys3(SYS_close, 3, 0, 0);
    if (message.flags & (MSG_TRUNC | MSG_CTRUNC))
        reject();
    const i32 *fds = 0;
    u32 nfds = 0;
    struct cmsghdr *c = (struct cmsghdr *)control;
    if (message.controllen >= sizeof *c && c->level == 1 && c->type == 1) { /* SCM_RIGHTS */
        fds = (const i32 *)(c + 1);
        nfds = (u32)((c->len - sizeof *c) / 4);
    }
    run((u64)length, fds, nfds);
}

__asm__(".globl _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  and $-16, %rsp\n"
        "  call launcher_main\n"
        "  hlt\n");
