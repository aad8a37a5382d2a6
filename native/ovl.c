/* overlay's C core: mounts, the new mount API, the fd-based tree walks.
 *
 * See ovl.h for the contract of each function.  Everything here works on
 * directory file descriptors and single path components, so trees deeper
 * than PATH_MAX are fine, and every descent goes through openat2() with
 * RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH: the kernel itself
 * refuses to follow a symlink, to cross into another mount (bind mounts of
 * the same filesystem included) or to leave the directory we were given.
 */
#define _GNU_SOURCE
#include "ovl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef OVL_SOURCE_HASH
#define OVL_SOURCE_HASH "unknown"
#endif

/* Our own names for the new mount API constants: glibc >= 2.36 declares some
 * of them as enums in <sys/mount.h>, and <linux/mount.h> clashes with it. */
#define OVL_FSOPEN_CLOEXEC 0x1u
#define OVL_FSMOUNT_CLOEXEC 0x1u
#define OVL_FSCONFIG_SET_FLAG 0u
#define OVL_FSCONFIG_SET_STRING 1u
#define OVL_FSCONFIG_SET_FD 5u
#define OVL_FSCONFIG_CMD_CREATE 6u
#define OVL_MOVE_MOUNT_F_EMPTY_PATH 0x4u
/* fsconfig() copies string values with strndup_user(value, 256). */
#define OVL_FSCONFIG_MAX_STRING 256

#ifndef SYS_fsopen
#define SYS_fsopen 430
#endif
#ifndef SYS_fsconfig
#define SYS_fsconfig 431
#endif
#ifndef SYS_fsmount
#define SYS_fsmount 432
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_renameat2
#define SYS_renameat2 316
#endif

#define OVL_RESOLVE_NO_XDEV 0x01ull
#define OVL_RESOLVE_NO_MAGICLINKS 0x02ull
#define OVL_RESOLVE_NO_SYMLINKS 0x04ull
#define OVL_RESOLVE_BENEATH 0x08ull

struct ovl_open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

struct ovl_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

int ovl_abi_version(void) { return OVL_ABI_VERSION; }

const char *ovl_source_hash(void) { return OVL_SOURCE_HASH; }

/* ------------------------------------------------------------------ mounts */

static size_t page_limit(void)
{
    long ps = sysconf(_SC_PAGESIZE);
    return ps > 0 ? (size_t)ps : 4096;
}

/* The kernel copies at most one page of mount data and may silently mount a
 * truncated option string (seen: a 60-layer overlay showing 3 layers).  We
 * refuse anything that does not fit, NUL included. */
static int data_fits(const char *data)
{
    if (data != NULL && strlen(data) + 1 > page_limit()) {
        errno = E2BIG;
        return 0;
    }
    return 1;
}

int ovl_mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const char *data)
{
    if (!data_fits(data))
        return -1;
    return mount(source, target, fstype, flags, data);
}

int ovl_umount2(const char *target, int flags) { return umount2(target, flags); }

struct mount_at_args {
    const char *cwd, *source, *target, *fstype, *data;
    unsigned long flags;
    int err;
};

static void *mount_at_thread(void *p)
{
    struct mount_at_args *a = p;
    /* CLONE_FS unshares cwd/root/umask for this thread only. */
    if (unshare(CLONE_FS) != 0 || chdir(a->cwd) != 0 ||
        mount(a->source, a->target, a->fstype, a->flags, a->data) != 0)
        a->err = errno;
    return NULL;
}

int ovl_mount_at(const char *cwd, const char *source, const char *target,
                 const char *fstype, unsigned long flags, const char *data)
{
    struct mount_at_args a = {cwd, source, target, fstype, data, flags, 0};
    pthread_t t;
    int rc;

    if (!data_fits(data))
        return -1;
    rc = pthread_create(&t, NULL, mount_at_thread, &a);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    pthread_join(t, NULL);
    if (a.err != 0) {
        errno = a.err;
        return -1;
    }
    return 0;
}

static int sys_fsopen(const char *fs, unsigned int flags)
{
    return (int)syscall(SYS_fsopen, fs, flags);
}

static int sys_fsconfig(int fd, unsigned int cmd, const char *key, const void *value, int aux)
{
    return (int)syscall(SYS_fsconfig, fd, cmd, key, value, aux);
}

/* Append the fs_context's messages ("e overlayfs: ...") to log. */
static void drain_log(int fsfd, char *log, size_t loglen)
{
    char msg[1024];
    size_t used;
    ssize_t n;

    if (log == NULL || loglen == 0)
        return;
    used = strnlen(log, loglen);
    while ((n = read(fsfd, msg, sizeof msg - 1)) > 0) {
        msg[n] = '\0';
        if (used + 1 < loglen)
            used += (size_t)snprintf(log + used, loglen - used, "%s%s", used ? "; " : "", msg);
        if (used >= loglen)
            used = loglen - 1;
    }
}

/* Set a path parameter: by string when it fits fsconfig's limit, else by an
 * O_PATH descriptor (kernels >= 6.13 accept one for overlay's layers). */
static int set_path(int fsfd, const char *key, const char *path)
{
    int fd, rc, saved;

    if (strlen(path) < OVL_FSCONFIG_MAX_STRING)
        return sys_fsconfig(fsfd, OVL_FSCONFIG_SET_STRING, key, path, 0);
    fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    rc = sys_fsconfig(fsfd, OVL_FSCONFIG_SET_FD, key, NULL, fd);
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

static int set_option(int fsfd, const char *opt)
{
    char key[OVL_FSCONFIG_MAX_STRING];
    const char *eq = strchr(opt, '=');
    size_t klen = eq ? (size_t)(eq - opt) : strlen(opt);

    if (klen == 0 || klen >= sizeof key) {
        errno = EINVAL;
        return -1;
    }
    memcpy(key, opt, klen);
    key[klen] = '\0';
    if (eq == NULL)
        return sys_fsconfig(fsfd, OVL_FSCONFIG_SET_FLAG, key, NULL, 0);
    return sys_fsconfig(fsfd, OVL_FSCONFIG_SET_STRING, key, eq + 1, 0);
}

int ovl_mount_overlay(const char *target, const char *const *lowers, size_t nlowers,
                      const char *upper, const char *work,
                      const char *const *options, size_t noptions,
                      unsigned int attrs, char *log, size_t loglen)
{
    int fsfd, mfd = -1, saved;
    const char *step = "fsconfig source", *arg = "";
    size_t i;

    if (log != NULL && loglen > 0)
        log[0] = '\0';
    if (nlowers == 0) {
        errno = EINVAL;
        return -1;
    }
    fsfd = sys_fsopen("overlay", OVL_FSOPEN_CLOEXEC);
    if (fsfd < 0)
        return -1;
    if (sys_fsconfig(fsfd, OVL_FSCONFIG_SET_STRING, "source", "overlay", 0) != 0)
        goto fail;
    step = "lowerdir+";
    for (i = 0; i < nlowers; i++)
        if (set_path(fsfd, "lowerdir+", (arg = lowers[i])) != 0)
            goto fail;
    step = "upperdir";
    if (upper != NULL && set_path(fsfd, "upperdir", (arg = upper)) != 0)
        goto fail;
    step = "workdir";
    if (work != NULL && set_path(fsfd, "workdir", (arg = work)) != 0)
        goto fail;
    step = "option";
    for (i = 0; i < noptions; i++)
        if (set_option(fsfd, (arg = options[i])) != 0)
            goto fail;
    step = "create";
    arg = "";
    if (sys_fsconfig(fsfd, OVL_FSCONFIG_CMD_CREATE, NULL, NULL, 0) != 0)
        goto fail;
    step = "fsmount";
    mfd = (int)syscall(SYS_fsmount, fsfd, OVL_FSMOUNT_CLOEXEC, attrs);
    if (mfd < 0)
        goto fail;
    step = "move_mount";
    if (syscall(SYS_move_mount, mfd, "", AT_FDCWD, target, OVL_MOVE_MOUNT_F_EMPTY_PATH) != 0)
        goto fail;
    close(mfd);
    close(fsfd);
    return 0;
fail:
    saved = errno;
    if (log != NULL && loglen > 0)
        snprintf(log, loglen, "%s%s%s", step, *arg ? " " : "", arg);
    drain_log(fsfd, log, loglen);
    if (mfd >= 0)
        close(mfd);
    close(fsfd);
    errno = saved;
    return -1;
}

int ovl_mount_api_support(void)
{
    int bits = 0, fsfd, fd;

    fsfd = sys_fsopen("overlay", OVL_FSOPEN_CLOEXEC);
    if (fsfd < 0)
        return 0;
    bits |= OVL_API_FSOPEN;
    if (sys_fsconfig(fsfd, OVL_FSCONFIG_SET_STRING, "lowerdir+", "/", 0) == 0) {
        bits |= OVL_API_LOWERDIR_ADD;
        fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
            if (sys_fsconfig(fsfd, OVL_FSCONFIG_SET_FD, "lowerdir+", NULL, fd) == 0)
                bits |= OVL_API_LOWERDIR_FD;
            close(fd);
        }
    }
    close(fsfd);
    return bits;
}

/* ------------------------------------------------------------- tree walks */

enum walk_mode { WALK_REMOVE, WALK_USAGE };

/* Kept open per worker before older ancestors' descriptors are closed (and
 * reopened on the way back up), so depth is not bounded by RLIMIT_NOFILE. */
#define FD_BUDGET 48
/* The parallel split expands the top of the tree breadth-first while a
 * level holds fewer directories than this. */
#define SPLIT_MAX_LEVEL 256
#define SPLIT_MAX_DEPTH 4

/* Names collected for later: packed (uint64 ino, NUL-terminated name). */
struct namebuf {
    char *p;
    size_t len, cap, n;
};

static int nb_push(struct namebuf *b, uint64_t ino, const char *name)
{
    size_t len = strlen(name) + 1, need = sizeof ino + len;

    if (b->len + need > b->cap) {
        size_t ncap = b->cap ? b->cap * 2 : 4096;
        char *np;
        while (ncap < b->len + need)
            ncap *= 2;
        np = realloc(b->p, ncap);
        if (np == NULL)
            return -1;
        b->p = np;
        b->cap = ncap;
    }
    memcpy(b->p + b->len, &ino, sizeof ino);
    memcpy(b->p + b->len + sizeof ino, name, len);
    b->len += need;
    b->n++;
    return 0;
}

/* A directory being walked.  Its subdirectories are collected while its
 * entries are read (files are handled on the spot), then descended one by
 * one: so no getdents position has to survive a descent, and the
 * descriptor can be closed and reopened at will. */
struct frame {
    struct frame *up;
    const char *name; /* in up->subs; NULL for a walk root */
    uint64_t ino;     /* expected inode, checked when reopening */
    int fd;           /* -1 while closed to save descriptors */
    int failed;       /* something below could not be removed */
    struct namebuf subs; /* its subdirectories, to descend into */
    size_t next;         /* read position in subs */
};

struct inoset {
    uint64_t *slots; /* (dev, ino) pairs; 0,0 = empty */
    size_t cap, used;
};

struct walk {
    enum walk_mode mode;
    int flags;
    const volatile int *cancel;
    ovl_report_fn report;
    void *ctx;
    pthread_mutex_t lock; /* guards links, first_err and the work queue */
    struct inoset links;
    int first_err;
    /* parallel work queue: subdirectories of the split frames */
    struct frame **queue_frames;
    size_t queue_len, queue_next;
};

struct wstats {
    uint64_t entries, bytes, errors;
};

static int sys_openat2_dir(int dirfd, const char *name)
{
    struct ovl_open_how how = {
        .flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
        .mode = 0,
        .resolve = OVL_RESOLVE_NO_XDEV | OVL_RESOLVE_NO_MAGICLINKS | OVL_RESOLVE_NO_SYMLINKS |
                   OVL_RESOLVE_BENEATH,
    };
    return (int)syscall(SYS_openat2, dirfd, name, &how, sizeof how);
}

/* Open a child directory without following symlinks or crossing mounts.
 * EXDEV means name is a mount point.  Falls back to openat + st_dev on
 * kernels without openat2 (< 5.6), which misses same-device bind mounts. */
static int open_child(int dirfd, const char *name, dev_t dev)
{
    struct stat st;
    int fd = sys_openat2_dir(dirfd, name);

    if (fd >= 0 || errno != ENOSYS)
        return fd;
    fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) != 0 || st.st_dev != dev) {
        close(fd);
        errno = EXDEV;
        return -1;
    }
    return fd;
}

/* The path of leaf (or of f when leaf is NULL) relative to the walk's root.
 * Built only when something is reported, so the walk itself never handles
 * path strings. */
static void path_of(const struct frame *f, const char *leaf, char **out)
{
    size_t len = 0, pos, n;
    const struct frame *p;
    char *buf;

    if (leaf)
        len += strlen(leaf);
    for (p = f; p != NULL; p = p->up)
        if (p->name)
            len += strlen(p->name) + (len ? 1 : 0);
    buf = malloc(len + 1);
    *out = buf;
    if (buf == NULL)
        return;
    pos = len;
    buf[pos] = '\0';
    if (leaf) {
        n = strlen(leaf);
        pos -= n;
        memcpy(buf + pos, leaf, n);
    }
    for (p = f; p != NULL; p = p->up) {
        if (!p->name)
            continue;
        if (pos != len)
            buf[--pos] = '/';
        n = strlen(p->name);
        pos -= n;
        memcpy(buf + pos, p->name, n);
    }
}

/* chmod a child directory to 0700 (for a caller without CAP_DAC_OVERRIDE
 * facing a 0000 directory) without following a symlink swapped in. */
static int chmod_child(int dirfd, const char *name)
{
    struct ovl_open_how how = {
        .flags = O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
        .mode = 0,
        .resolve = OVL_RESOLVE_NO_XDEV | OVL_RESOLVE_NO_MAGICLINKS | OVL_RESOLVE_NO_SYMLINKS |
                   OVL_RESOLVE_BENEATH,
    };
    char proc[64];
    int fd = (int)syscall(SYS_openat2, dirfd, name, &how, sizeof how), rc, saved;

    if (fd < 0)
        return -1;
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    rc = chmod(proc, 0700);
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

static void report(struct walk *w, struct wstats *s, const struct frame *f, const char *leaf,
                   int err)
{
    char *path = NULL;

    s->errors++;
    pthread_mutex_lock(&w->lock);
    if (w->first_err == 0)
        w->first_err = err;
    pthread_mutex_unlock(&w->lock);
    if (w->report == NULL)
        return;
    path_of(f, leaf, &path);
    w->report(w->ctx, path ? path : "", err);
    free(path);
}

static int cancelled(const struct walk *w) { return w->cancel != NULL && *w->cancel != 0; }

/* Insert (dev, ino); returns 1 when it was new, 0 when seen, -1 on ENOMEM. */
static int inoset_add(struct inoset *s, uint64_t dev, uint64_t ino)
{
    size_t i, mask;

    if (s->used * 2 >= s->cap) {
        size_t ncap = s->cap ? s->cap * 2 : 1024, j;
        uint64_t *n = calloc(ncap * 2, sizeof *n);
        if (n == NULL)
            return -1;
        for (j = 0; j < s->cap; j++) {
            uint64_t d = s->slots[2 * j], x = s->slots[2 * j + 1];
            size_t k;
            if (d == 0 && x == 0)
                continue;
            for (k = (size_t)((x * 0x9E3779B97F4A7C15ull) ^ d) & (ncap - 1); n[2 * k] || n[2 * k + 1];
                 k = (k + 1) & (ncap - 1))
                ;
            n[2 * k] = d;
            n[2 * k + 1] = x;
        }
        free(s->slots);
        s->slots = n;
        s->cap = ncap;
    }
    mask = s->cap - 1;
    dev += 1; /* keep (0, 0) free as the empty marker */
    for (i = (size_t)((ino * 0x9E3779B97F4A7C15ull) ^ dev) & mask; s->slots[2 * i] || s->slots[2 * i + 1];
         i = (i + 1) & mask)
        if (s->slots[2 * i] == dev && s->slots[2 * i + 1] == ino)
            return 0;
    s->slots[2 * i] = dev;
    s->slots[2 * i + 1] = ino;
    s->used++;
    return 1;
}

/* Account one inode for the usage walk: hard links counted once. */
static int count_inode(struct walk *w, struct wstats *s, const struct stat *st)
{
    if (!S_ISDIR(st->st_mode) && st->st_nlink > 1) {
        int isnew;
        pthread_mutex_lock(&w->lock);
        isnew = inoset_add(&w->links, (uint64_t)st->st_dev, (uint64_t)st->st_ino);
        pthread_mutex_unlock(&w->lock);
        if (isnew < 0)
            return -1;
        if (isnew == 0)
            return 0;
    }
    s->entries++;
    s->bytes += (uint64_t)st->st_blocks * 512u;
    return 0;
}

static int push_sub(struct frame *f, uint64_t ino, const char *name)
{
    return nb_push(&f->subs, ino, name);
}

/* Next collected subdirectory of f, or NULL. */
static const char *next_sub(struct frame *f, uint64_t *ino)
{
    const char *name;

    if (f->next >= f->subs.len)
        return NULL;
    memcpy(ino, f->subs.p + f->next, sizeof *ino);
    name = f->subs.p + f->next + sizeof *ino;
    f->next += sizeof *ino + strlen(name) + 1;
    return name;
}

static int by_ino(const void *a, const void *b)
{
    uint64_t x, y;
    memcpy(&x, *(char *const *)a, sizeof x);
    memcpy(&y, *(char *const *)b, sizeof y);
    return x < y ? -1 : x > y;
}

/* Directories with more entries than this are unlinked in inode order, as
 * rm(1) does: on ext4 that walks the inode table sequentially instead of in
 * hash order (measured: ~15% faster on a flat 100k-file directory). */
#define SORT_THRESHOLD 2048

/* Unlink the non-directories collected from f. */
static int unlink_files(struct walk *w, struct wstats *s, struct frame *f, struct namebuf *b)
{
    char **order = NULL, *rec;
    size_t i, off;

    if (b->n == 0)
        return 0;
    if (b->n > SORT_THRESHOLD) {
        order = malloc(b->n * sizeof *order);
        if (order != NULL) {
            for (i = 0, off = 0; i < b->n; i++) {
                order[i] = b->p + off;
                off += sizeof(uint64_t) + strlen(b->p + off + sizeof(uint64_t)) + 1;
            }
            qsort(order, b->n, sizeof *order, by_ino);
        }
    }
    for (i = 0, off = 0; i < b->n; i++) {
        const char *name;
        struct stat st;
        int have_st = 0;

        if (order != NULL) {
            rec = order[i];
        } else {
            rec = b->p + off;
            off += sizeof(uint64_t) + strlen(rec + sizeof(uint64_t)) + 1;
        }
        name = rec + sizeof(uint64_t);
        if (cancelled(w)) {
            free(order);
            errno = ECANCELED;
            return -1;
        }
        /* stat right before the unlink: the last link of a hard-linked
         * file is the one that frees its blocks */
        if ((w->flags & OVL_TREE_COUNT_BYTES) && fstatat(f->fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0)
            have_st = 1;
        if (unlinkat(f->fd, name, 0) == 0) {
            s->entries++;
            if (have_st && st.st_nlink == 1)
                s->bytes += (uint64_t)st.st_blocks * 512u;
        } else if (errno == EISDIR) {
            uint64_t ino;
            memcpy(&ino, rec, sizeof ino);
            if (push_sub(f, ino, name) != 0) {
                free(order);
                return -1;
            }
        } else if (errno != ENOENT) {
            report(w, s, f, name, errno);
            f->failed = 1;
        }
    }
    free(order);
    return 0;
}

/* Read every entry of f: count (usage) or collect (removal) the
 * non-directories, collect the directories for the descent. */
static int scan_dir(struct walk *w, struct wstats *s, struct frame *f, dev_t dev)
{
    char buf[32768];
    struct namebuf files = {NULL, 0, 0, 0};
    long n;
    int rc = 0;

    for (;;) {
        n = syscall(SYS_getdents64, f->fd, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* ENOENT: the directory itself was removed meanwhile (another
             * remover got there first); nothing is left to do in it */
            if (errno != ENOENT) {
                report(w, s, f, NULL, errno);
                f->failed = 1;
                rc = -1;
            }
            break;
        }
        for (long off = 0; off < n;) {
            struct ovl_dirent64 *d = (struct ovl_dirent64 *)(buf + off);
            const char *name = d->d_name;
            unsigned char type = d->d_type;
            struct stat st;

            off += d->d_reclen;
            if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0')))
                continue;
            if (cancelled(w)) {
                free(files.p);
                errno = ECANCELED;
                return -1;
            }
            if (type == DT_UNKNOWN || w->mode == WALK_USAGE) {
                if (fstatat(f->fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
                    if (errno == ENOENT)
                        continue;
                    report(w, s, f, name, errno);
                    f->failed = 1;
                    continue;
                }
                type = S_ISDIR(st.st_mode) ? DT_DIR : DT_REG;
            }
            if (w->mode == WALK_USAGE) {
                if (S_ISDIR(st.st_mode)) {
                    if (st.st_dev != dev)
                        continue; /* a mount point: not ours to count */
                    if (push_sub(f, d->d_ino, name) != 0)
                        goto nomem;
                }
                if (count_inode(w, s, &st) != 0)
                    goto nomem;
                continue;
            }
            if (type == DT_DIR) {
                if (push_sub(f, d->d_ino, name) != 0)
                    goto nomem;
            } else if (nb_push(&files, d->d_ino, name) != 0) {
                goto nomem;
            }
        }
    }
    if (unlink_files(w, s, f, &files) != 0) {
        int saved = errno;
        free(files.p);
        errno = saved;
        return -1;
    }
    free(files.p);
    return rc;
nomem:
    free(files.p);
    errno = ENOMEM;
    return -1;
}

static struct frame *new_frame(struct frame *up, const char *name, uint64_t ino, int fd)
{
    struct frame *f = calloc(1, sizeof *f);
    if (f == NULL)
        return NULL;
    f->up = up;
    f->name = name;
    f->ino = ino;
    f->fd = fd;
    return f;
}

static void free_frame(struct frame *f)
{
    if (f->fd >= 0)
        close(f->fd);
    free(f->subs.p);
    free(f);
}

/* Reopen closed descriptors from the nearest open ancestor down to f,
 * checking each directory is the one we left (same inode). */
static int reopen(struct frame *f, dev_t dev)
{
    struct stat st;

    if (f->fd >= 0)
        return 0;
    if (f->up == NULL || reopen(f->up, dev) != 0)
        return -1;
    f->fd = open_child(f->up->fd, f->name, dev);
    if (f->fd < 0)
        return -1;
    if (fstat(f->fd, &st) != 0 || st.st_ino != f->ino) {
        close(f->fd);
        f->fd = -1;
        errno = ESTALE;
        return -1;
    }
    return 0;
}

/* Finish a directory whose contents are gone: remove it from its parent. */
static void remove_dir(struct walk *w, struct wstats *s, struct frame *child, dev_t dev)
{
    struct frame *parent = child->up;
    struct stat st;
    int have_st = 0;

    if (w->flags & OVL_TREE_COUNT_BYTES)
        have_st = child->fd >= 0 && fstat(child->fd, &st) == 0;
    if (child->fd >= 0) {
        close(child->fd);
        child->fd = -1;
    }
    if (reopen(parent, dev) != 0) {
        report(w, s, parent, NULL, errno);
        parent->failed = 1;
        return;
    }
    if (unlinkat(parent->fd, child->name, AT_REMOVEDIR) == 0) {
        s->entries++;
        if (have_st)
            s->bytes += (uint64_t)st.st_blocks * 512u;
        return;
    }
    if (errno == ENOENT)
        return;
    parent->failed = 1;
    /* ENOTEMPTY below a reported failure is only its consequence. */
    if (!(errno == ENOTEMPTY && child->failed))
        report(w, s, parent, child->name, errno);
}

/* Depth-first walk below root (whose fd is open and which stays open).
 * Frames are heap-allocated and linked upwards, so path reporting and
 * reopening work at any depth; only FD_BUDGET descriptors stay open. */
static int walk_subtree(struct walk *w, struct wstats *s, struct frame *root, dev_t dev)
{
    struct frame **stack = NULL, *f, *child;
    size_t depth = 0, cap = 0;
    const char *name;
    uint64_t ino;
    int rc = 0;

    if (scan_dir(w, s, root, dev) != 0 && (errno == ECANCELED || errno == ENOMEM))
        return -1;
    f = root;
    for (;;) {
        if (cancelled(w)) {
            errno = ECANCELED;
            rc = -1;
            break;
        }
        if (reopen(f, dev) != 0) {
            report(w, s, f, NULL, errno);
            f->failed = 1;
            name = NULL;
        } else {
            name = next_sub(f, &ino);
        }
        if (name == NULL) {
            /* f is done */
            if (f == root)
                break;
            child = f;
            f = child->up;
            depth--;
            if (w->mode == WALK_REMOVE)
                remove_dir(w, s, child, dev);
            if (child->failed)
                f->failed = 1;
            free_frame(child);
            continue;
        }
        {
            int cfd = open_child(f->fd, name, dev);
            if (cfd < 0) {
                int err = errno;
                if (err == ENOENT)
                    continue;
                if (err == EACCES && w->mode == WALK_REMOVE &&
                    chmod_child(f->fd, name) == 0)
                    cfd = open_child(f->fd, name, dev);
                if (cfd < 0) {
                    err = errno;
                    if (err == EXDEV) {
                        /* a mount point: never descend; a removal reports
                         * what rmdir says about it (EBUSY) */
                        if (w->mode == WALK_USAGE)
                            continue;
                        if (unlinkat(f->fd, name, AT_REMOVEDIR) == 0) {
                            s->entries++;
                            continue;
                        }
                        err = errno;
                    }
                    report(w, s, f, name, err);
                    f->failed = 1;
                    continue;
                }
            }
            child = new_frame(f, name, ino, cfd);
            if (child == NULL) {
                close(cfd);
                rc = -1;
                errno = ENOMEM;
                break;
            }
        }
        if (depth + 1 > cap) {
            size_t ncap = cap ? cap * 2 : 64;
            struct frame **ns = realloc(stack, ncap * sizeof *ns);
            if (ns == NULL) {
                free_frame(child);
                rc = -1;
                errno = ENOMEM;
                break;
            }
            stack = ns;
            cap = ncap;
        }
        stack[depth++] = child;
        if (depth > FD_BUDGET && stack[depth - FD_BUDGET - 1]->fd >= 0) {
            close(stack[depth - FD_BUDGET - 1]->fd);
            stack[depth - FD_BUDGET - 1]->fd = -1;
        }
        f = child;
        if (scan_dir(w, s, f, dev) != 0 && (errno == ECANCELED || errno == ENOMEM)) {
            rc = -1;
            break;
        }
    }
    if (rc != 0) {
        int saved = errno;
        while (f != root) {
            child = f;
            f = f->up;
            free_frame(child);
        }
        errno = saved;
    }
    free(stack);
    return rc;
}

struct worker {
    struct walk *w;
    struct wstats s;
    dev_t dev;
    int err;
    pthread_t thread;
};

/* Take the next queued subtree: (split frame, its next subdirectory). */
static struct frame *take_item(struct walk *w, const char **name, uint64_t *ino)
{
    struct frame *f = NULL;

    pthread_mutex_lock(&w->lock);
    while (w->queue_next < w->queue_len) {
        struct frame *cand = w->queue_frames[w->queue_next];
        *name = next_sub(cand, ino);
        if (*name != NULL) {
            f = cand;
            break;
        }
        w->queue_next++;
    }
    pthread_mutex_unlock(&w->lock);
    return f;
}

static void *worker_main(void *p)
{
    struct worker *k = p;
    struct walk *w = k->w;
    const char *name;
    uint64_t ino;
    struct frame *parent;

    while ((parent = take_item(w, &name, &ino)) != NULL) {
        struct frame *sub;
        int fd = open_child(parent->fd, name, k->dev);
        if (fd < 0) {
            int err = errno;
            if (err == ENOENT)
                continue;
            if (err == EACCES && w->mode == WALK_REMOVE && chmod_child(parent->fd, name) == 0)
                fd = open_child(parent->fd, name, k->dev);
            if (fd < 0) {
                err = errno;
                if (err == EXDEV && w->mode == WALK_USAGE)
                    continue;
                if (err == EXDEV && unlinkat(parent->fd, name, AT_REMOVEDIR) == 0) {
                    k->s.entries++;
                    continue;
                }
                report(w, &k->s, parent, name, errno);
                parent->failed = 1;
                continue;
            }
        }
        sub = new_frame(parent, name, ino, fd);
        if (sub == NULL) {
            close(fd);
            k->err = ENOMEM;
            break;
        }
        if (walk_subtree(w, &k->s, sub, k->dev) != 0) {
            k->err = errno;
            free_frame(sub);
            if (k->err == ECANCELED || k->err == ENOMEM)
                break;
            continue;
        }
        if (w->mode == WALK_REMOVE) {
            /* parent->fd is a split frame: always open */
            remove_dir(w, &k->s, sub, k->dev);
            if (sub->failed)
                parent->failed = 1;
        }
        free_frame(sub);
    }
    return NULL;
}

/* Walk root with nthreads: expand the top of the tree breadth-first on
 * this thread (handling the files found there) until a level is wide
 * enough, then let the workers take its subdirectories one subtree each. */
static int walk_parallel(struct walk *w, struct wstats *s, struct frame *root, dev_t dev,
                         int nthreads)
{
    struct frame **levels = NULL, **cur, **next = NULL;
    size_t nlevels = 0, ncur = 1, nnext, total = 0, i;
    struct worker *workers = NULL;
    int depth, rc = 0, saved = 0;

    levels = malloc(sizeof *levels);
    if (levels == NULL) {
        errno = ENOMEM;
        return -1;
    }
    levels[0] = root;
    nlevels = 1;
    if (scan_dir(w, s, root, dev) != 0 && (errno == ECANCELED || errno == ENOMEM))
        goto fail;
    cur = levels;
    for (depth = 0; depth < SPLIT_MAX_DEPTH; depth++) {
        size_t subs = 0;
        for (i = 0; i < ncur; i++)
            subs += cur[i]->subs.n;
        if (subs == 0 || subs >= (size_t)nthreads * 16 || subs > SPLIT_MAX_LEVEL)
            break;
        /* expand: open every subdirectory of this level as a split frame */
        {
            struct frame **grown = realloc(levels, (nlevels + subs) * sizeof *levels);
            if (grown == NULL) {
                errno = ENOMEM;
                goto fail;
            }
            cur = grown + (cur - levels);
            levels = grown;
        }
        next = levels + nlevels;
        nnext = 0;
        for (i = 0; i < ncur; i++) {
            struct frame *f = cur[i];
            const char *name;
            uint64_t ino;
            while ((name = next_sub(f, &ino)) != NULL) {
                struct frame *c;
                int fd = open_child(f->fd, name, dev);
                if (fd < 0 && errno == EACCES && w->mode == WALK_REMOVE &&
                    chmod_child(f->fd, name) == 0)
                    fd = open_child(f->fd, name, dev);
                if (fd < 0) {
                    int err = errno;
                    if (err == ENOENT || (err == EXDEV && w->mode == WALK_USAGE))
                        continue;
                    if (err == EXDEV && unlinkat(f->fd, name, AT_REMOVEDIR) == 0) {
                        s->entries++;
                        continue;
                    }
                    report(w, s, f, name, errno);
                    f->failed = 1;
                    continue;
                }
                c = new_frame(f, name, ino, fd);
                if (c == NULL) {
                    close(fd);
                    errno = ENOMEM;
                    goto fail;
                }
                next[nnext++] = c;
                nlevels++;
                if (scan_dir(w, s, c, dev) != 0 && (errno == ECANCELED || errno == ENOMEM))
                    goto fail;
            }
        }
        cur = next;
        ncur = nnext;
        if (ncur == 0)
            break;
    }
    /* the last level's frames (or root) still hold unvisited subdirectories */
    w->queue_frames = cur;
    w->queue_len = ncur;
    w->queue_next = 0;
    {
        /* no more threads than subtrees left: a small tree spawns none */
        size_t left = 0;
        for (i = 0; i < ncur; i++)
            left += cur[i]->subs.n;
        if (left < (size_t)nthreads)
            nthreads = left > 0 ? (int)left : 1;
    }
    workers = calloc((size_t)nthreads, sizeof *workers);
    if (workers == NULL) {
        errno = ENOMEM;
        goto fail;
    }
    for (i = 0; i < (size_t)nthreads; i++) {
        workers[i].w = w;
        workers[i].dev = dev;
        if (i > 0 && pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0) {
            workers[i].w = NULL;
        }
    }
    worker_main(&workers[0]);
    for (i = 0; i < (size_t)nthreads; i++) {
        if (i > 0 && workers[i].w != NULL)
            pthread_join(workers[i].thread, NULL);
        s->entries += workers[i].s.entries;
        s->bytes += workers[i].s.bytes;
        s->errors += workers[i].s.errors;
        total++;
        if (workers[i].err == ECANCELED || workers[i].err == ENOMEM)
            saved = workers[i].err;
    }
    free(workers);
    if (saved != 0) {
        errno = saved;
        rc = -1;
    }
    /* remove the split frames bottom-up (children were appended after
     * their parents, so reverse order is a post-order) */
    for (i = nlevels; i-- > 1;) {
        if (rc == 0 && w->mode == WALK_REMOVE)
            remove_dir(w, s, levels[i], dev);
        if (levels[i]->failed)
            levels[i]->up->failed = 1;
        free_frame(levels[i]);
    }
    free(levels);
    (void)total;
    return rc;
fail:
    saved = errno;
    for (i = nlevels; i-- > 1;)
        free_frame(levels[i]);
    free(levels);
    errno = saved;
    return -1;
}

static int walk_tree(struct walk *w, const char *path, int nthreads, struct ovl_tree_stats *out)
{
    struct wstats s = {0, 0, 0};
    struct frame *root;
    struct stat st;
    int fd, rc;

    memset(out, 0, sizeof *out);
    fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    root = new_frame(NULL, NULL, (uint64_t)st.st_ino, fd);
    if (root == NULL) {
        close(fd);
        errno = ENOMEM;
        return -1;
    }
    pthread_mutex_init(&w->lock, NULL);
    if (w->mode == WALK_USAGE)
        count_inode(w, &s, &st);
    if (nthreads > 1)
        rc = walk_parallel(w, &s, root, st.st_dev, nthreads);
    else
        rc = walk_subtree(w, &s, root, st.st_dev);
    free_frame(root);
    pthread_mutex_destroy(&w->lock);
    free(w->links.slots);
    out->entries = s.entries;
    out->bytes = s.bytes;
    out->errors = s.errors;
    return rc;
}

/* Split path into a parent descriptor and a final component. */
static int open_parent(const char *path, char *leaf, size_t leaflen)
{
    char *copy = strdup(path), *slash, *dir;
    size_t len;
    int fd;

    if (copy == NULL) {
        errno = ENOMEM;
        return -1;
    }
    len = strlen(copy);
    while (len > 1 && copy[len - 1] == '/')
        copy[--len] = '\0';
    slash = strrchr(copy, '/');
    if (slash == NULL) {
        dir = ".";
        slash = copy - 1;
    } else if (slash == copy) {
        dir = "/";
    } else {
        *slash = '\0';
        dir = copy;
    }
    if (strlen(slash + 1) >= leaflen || slash[1] == '\0' || strcmp(slash + 1, ".") == 0 ||
        strcmp(slash + 1, "..") == 0) {
        free(copy);
        errno = EINVAL;
        return -1;
    }
    strcpy(leaf, slash + 1);
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(copy);
    return fd;
}

int ovl_remove_tree(const char *path, int flags, int nthreads,
                    struct ovl_tree_stats *stats, ovl_report_fn report_fn, void *ctx)
{
    struct walk w;
    char leaf[NAME_MAX + 1];
    int pfd = -1, rc, saved;

    memset(&w, 0, sizeof w);
    w.mode = WALK_REMOVE;
    w.flags = flags;
    w.report = report_fn;
    w.ctx = ctx;
    if (!(flags & OVL_TREE_KEEP_ROOT)) {
        pfd = open_parent(path, leaf, sizeof leaf);
        if (pfd < 0)
            return -1;
    }
    rc = walk_tree(&w, path, nthreads, stats);
    saved = errno;
    if (rc == 0 && w.first_err != 0) {
        rc = -1;
        saved = w.first_err;
    }
    if (rc == 0 && pfd >= 0) {
        struct stat st;
        int have = (flags & OVL_TREE_COUNT_BYTES) && fstatat(pfd, leaf, &st, AT_SYMLINK_NOFOLLOW) == 0;
        if (unlinkat(pfd, leaf, AT_REMOVEDIR) == 0) {
            stats->entries++;
            if (have)
                stats->bytes += (uint64_t)st.st_blocks * 512u;
        } else {
            saved = errno;
            rc = -1;
            stats->errors++;
            if (report_fn)
                report_fn(ctx, "", saved);
        }
    }
    if (pfd >= 0)
        close(pfd);
    errno = saved;
    return rc;
}

int ovl_disk_usage(const char *path, int nthreads, const volatile int *cancel,
                   struct ovl_tree_stats *stats, ovl_report_fn report_fn, void *ctx)
{
    struct walk w;
    int rc;

    memset(&w, 0, sizeof w);
    w.mode = WALK_USAGE;
    w.cancel = cancel;
    w.report = report_fn;
    w.ctx = ctx;
    rc = walk_tree(&w, path, nthreads, stats);
    if (rc == 0 && w.first_err != 0) {
        errno = w.first_err;
        return -1;
    }
    return rc;
}

/* ------------------------------------------------------------ small helpers */

int ovl_renameat2(const char *oldpath, const char *newpath, unsigned int flags)
{
    return (int)syscall(SYS_renameat2, AT_FDCWD, oldpath, AT_FDCWD, newpath, flags);
}

int ovl_syncfs(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC), rc, saved;

    if (fd < 0)
        return -1;
    rc = syncfs(fd);
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

static int dtype_scan(int fd, int *seen)
{
    char buf[8192];
    long n;

    while ((n = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0) {
        for (long off = 0; off < n;) {
            struct ovl_dirent64 *d = (struct ovl_dirent64 *)(buf + off);
            off += d->d_reclen;
            if (d->d_name[0] == '.' &&
                (d->d_name[1] == '\0' || (d->d_name[1] == '.' && d->d_name[2] == '\0')))
                continue;
            if (d->d_type == DT_UNKNOWN)
                return 0;
            *seen = 1;
        }
    }
    return n < 0 ? -1 : 1;
}

int ovl_dir_has_dtype(const char *path)
{
    static const char probe[] = ".ovl-dtype-probe";
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC), seen = 0, rc, saved, pfd;

    if (fd < 0)
        return -1;
    rc = dtype_scan(fd, &seen);
    if (rc == 1 && !seen) {
        pfd = openat(fd, probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (pfd < 0) {
            rc = -1;
        } else {
            close(pfd);
            lseek(fd, 0, SEEK_SET);
            rc = dtype_scan(fd, &seen);
            saved = errno;
            unlinkat(fd, probe, 0);
            errno = saved;
            if (rc == 1 && !seen) {
                rc = -1;
                errno = EIO;
            }
        }
    }
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int ovl_fs_magic(const char *path, int64_t *magic)
{
    struct statfs sf;

    if (statfs(path, &sf) != 0)
        return -1;
    *magic = (int64_t)sf.f_type;
    return 0;
}
