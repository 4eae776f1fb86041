/*
 * faultfs: an LD_PRELOAD shim that simulates disk faults and power loss for
 * the files of one directory tree (the ordo data dir under test).
 *
 *   FAULTFS_DIR=/path        only files under this directory are affected
 *   FAULTFS_SHADOW=/path     power loss: every fsync/fdatasync of a file
 *                            under FAULTFS_DIR copies the file into this
 *                            directory (same relative path). The shadow is
 *                            therefore what a power cut would leave: data
 *                            that was synced, never data that was only
 *                            written (sync_file_range does not count).
 *                            Renames and unlinks are mirrored.
 *   FAULTFS_FAIL=op:errno:n  from the n-th call of op on, fail with errno
 *                            (sticky: a broken disk stays broken).
 *                            op: sync (fsync, fdatasync, sync_file_range)
 *                            or write (write, pwrite, pwrite64, writev,
 *                            pwritev); errno: EIO or ENOSPC.
 *   FAULTFS_SYNC_DELAY_MS=n  every fsync/fdatasync of a file under
 *                            FAULTFS_DIR first sleeps n ms (a slow disk).
 *   FAULTFS_LOG=1            log each injected fault to stderr.
 *
 * Build: cc -shared -fPIC -O2 -o faultfs.so faultfs.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { OP_NONE, OP_SYNC, OP_WRITE };

static char dir[PATH_MAX];
static size_t dir_len;
static char shadow[PATH_MAX];
static int fail_op = OP_NONE;
static int fail_errno;
static long fail_after;
static int log_faults;
static long sync_delay_ms;
static atomic_long calls;
static atomic_int broken;

#define REAL(name) static __typeof__(name) *real_##name
REAL(fsync);
REAL(fdatasync);
REAL(sync_file_range);
REAL(write);
REAL(pwrite);
REAL(pwrite64);
REAL(writev);
REAL(pwritev);
REAL(rename);
REAL(renameat);
REAL(unlink);
REAL(unlinkat);

__attribute__((constructor)) static void faultfs_init(void) {
#define LOAD(name) real_##name = (__typeof__(real_##name))dlsym(RTLD_NEXT, #name)
    LOAD(fsync);
    LOAD(fdatasync);
    LOAD(sync_file_range);
    LOAD(write);
    LOAD(pwrite);
    LOAD(pwrite64);
    LOAD(writev);
    LOAD(pwritev);
    LOAD(rename);
    LOAD(renameat);
    LOAD(unlink);
    LOAD(unlinkat);
    const char *d = getenv("FAULTFS_DIR");
    if (d && realpath(d, dir)) dir_len = strlen(dir);
    const char *s = getenv("FAULTFS_SHADOW");
    if (s) snprintf(shadow, sizeof shadow, "%s", s);
    log_faults = getenv("FAULTFS_LOG") != NULL;
    const char *delay = getenv("FAULTFS_SYNC_DELAY_MS");
    if (delay) sync_delay_ms = atol(delay);
    const char *f = getenv("FAULTFS_FAIL");
    if (f) {
        char op[16] = {0}, err[16] = {0};
        long n = 1;
        if (sscanf(f, "%15[^:]:%15[^:]:%ld", op, err, &n) >= 2) {
            fail_op = !strcmp(op, "sync") ? OP_SYNC : !strcmp(op, "write") ? OP_WRITE : OP_NONE;
            fail_errno = !strcmp(err, "ENOSPC") ? ENOSPC : EIO;
            fail_after = n < 1 ? 1 : n;
        }
    }
}

/* Whether `path` is under the directory; writes the relative part. */
static int under(const char *path, const char **rel) {
    if (!dir_len || strncmp(path, dir, dir_len) != 0) return 0;
    if (path[dir_len] != '/' && path[dir_len] != '\0') return 0;
    *rel = path + dir_len;
    return 1;
}

static int fd_path(int fd, char *out) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n < 0) return -1;
    out[n] = '\0';
    return 0;
}

static int fd_under(int fd, const char **rel, char *buf) {
    if (!dir_len || fd_path(fd, buf) != 0) return 0;
    return under(buf, rel);
}

static int inject(int op, int fd) {
    if (fail_op != op) return 0;
    char buf[PATH_MAX];
    const char *rel;
    if (!fd_under(fd, &rel, buf)) return 0;
    if (!atomic_load(&broken)) {
        if (atomic_fetch_add(&calls, 1) + 1 < fail_after) return 0;
        atomic_store(&broken, 1);
    }
    if (log_faults) fprintf(stderr, "faultfs: injecting %s on %s\n", strerror(fail_errno), buf);
    errno = fail_errno;
    return 1;
}

static void mkdirs(char *path) {
    for (char *p = path + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(path, 0755);
            *p = '/';
        }
    }
}

/* Copies the synced file into the shadow tree (atomically replaced). */
static void snapshot(int fd) {
    if (!shadow[0]) return;
    char buf[PATH_MAX];
    const char *rel;
    if (!fd_under(fd, &rel, buf)) return;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    char dest[PATH_MAX], tmp[PATH_MAX + 16];
    snprintf(dest, sizeof dest, "%s%s", shadow, rel);
    snprintf(tmp, sizeof tmp, "%s.faultfs-tmp", dest);
    mkdirs(dest);
    /* The synced fd may be write-only: read the file through its path. */
    int in = open(buf, O_RDONLY | O_CLOEXEC);
    if (in < 0) return;
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        close(in);
        return;
    }
    static __thread char chunk[1 << 20];
    off_t off = 0;
    for (;;) {
        ssize_t n = pread(in, chunk, sizeof chunk, off);
        if (n <= 0) break;
        ssize_t w = 0;
        while (w < n) {
            ssize_t k = real_write(out, chunk + w, (size_t)(n - w));
            if (k <= 0) break;
            w += k;
        }
        off += n;
    }
    close(in);
    close(out);
    real_rename(tmp, dest);
}

/* FAULTFS_SYNC_DELAY_MS: a slow disk, for the files under the directory. */
static void slow_sync(int fd) {
    if (sync_delay_ms <= 0) return;
    char buf[PATH_MAX];
    const char *rel;
    if (!fd_under(fd, &rel, buf)) return;
    struct timespec t = {sync_delay_ms / 1000, (sync_delay_ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

int fsync(int fd) {
    if (inject(OP_SYNC, fd)) return -1;
    slow_sync(fd);
    int r = real_fsync(fd);
    if (r == 0) snapshot(fd);
    return r;
}

int fdatasync(int fd) {
    if (inject(OP_SYNC, fd)) return -1;
    slow_sync(fd);
    int r = real_fdatasync(fd);
    if (r == 0) snapshot(fd);
    return r;
}

int sync_file_range(int fd, off64_t off, off64_t n, unsigned int flags) {
    if (inject(OP_SYNC, fd)) return -1;
    return real_sync_file_range(fd, off, n, flags);
}

ssize_t write(int fd, const void *b, size_t n) {
    if (fail_op == OP_WRITE && inject(OP_WRITE, fd)) return -1;
    return real_write(fd, b, n);
}

ssize_t pwrite(int fd, const void *b, size_t n, off_t off) {
    if (fail_op == OP_WRITE && inject(OP_WRITE, fd)) return -1;
    return real_pwrite(fd, b, n, off);
}

ssize_t pwrite64(int fd, const void *b, size_t n, off64_t off) {
    if (fail_op == OP_WRITE && inject(OP_WRITE, fd)) return -1;
    return real_pwrite64(fd, b, n, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    if (fail_op == OP_WRITE && inject(OP_WRITE, fd)) return -1;
    return real_writev(fd, iov, cnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    if (fail_op == OP_WRITE && inject(OP_WRITE, fd)) return -1;
    return real_pwritev(fd, iov, cnt, off);
}

static void mirror_rename(const char *from, const char *to) {
    if (!shadow[0]) return;
    char a[PATH_MAX], b[PATH_MAX];
    const char *ra, *rb;
    /* Paths may be relative or not exist yet: resolve their directory. */
    if (!realpath(from, a) && from[0] == '/') snprintf(a, sizeof a, "%s", from);
    if (to[0] == '/') snprintf(b, sizeof b, "%s", to);
    else if (!getcwd(b, sizeof b) || strlen(b) + strlen(to) + 2 > sizeof b) return;
    else { strcat(b, "/"); strcat(b, to); }
    if (!under(a, &ra) || !under(b, &rb)) return;
    char sa[PATH_MAX], sb[PATH_MAX];
    snprintf(sa, sizeof sa, "%s%s", shadow, ra);
    snprintf(sb, sizeof sb, "%s%s", shadow, rb);
    mkdirs(sb);
    real_rename(sa, sb);
}

int rename(const char *from, const char *to) {
    char resolved[PATH_MAX];
    const char *src = realpath(from, resolved) ? resolved : from;
    char saved[PATH_MAX];
    snprintf(saved, sizeof saved, "%s", src);
    int r = real_rename(from, to);
    if (r == 0) mirror_rename(saved, to);
    return r;
}

int renameat(int olddirfd, const char *from, int newdirfd, const char *to) {
    int r = real_renameat(olddirfd, from, newdirfd, to);
    if (r == 0 && olddirfd == AT_FDCWD && newdirfd == AT_FDCWD && from[0] == '/')
        mirror_rename(from, to);
    return r;
}

static void mirror_unlink(const char *path) {
    if (!shadow[0] || path[0] != '/') return;
    const char *rel;
    if (!under(path, &rel)) return;
    char s[PATH_MAX];
    snprintf(s, sizeof s, "%s%s", shadow, rel);
    real_unlink(s);
}

int unlink(const char *path) {
    int r = real_unlink(path);
    if (r == 0) mirror_unlink(path);
    return r;
}

int unlinkat(int dirfd, const char *path, int flags) {
    int r = real_unlinkat(dirfd, path, flags);
    if (r == 0 && !(flags & AT_REMOVEDIR) && (dirfd == AT_FDCWD || path[0] == '/'))
        mirror_unlink(path);
    return r;
}
