/* overlay's C core: the prototypes Python sees.
 *
 * This header is both included by ovl.c and fed (minus preprocessor lines
 * other than #define) to cffi's cdef, so it must stay plain C declarations.
 *
 * Rules (DESIGN §4): ints and const char * in; 0 (or a count) on success,
 * -1 with errno set on failure; C never allocates what Python must free,
 * never logs and keeps no global state; every symbol starts with ovl_.
 */
#ifndef OVL_H
#define OVL_H

#include <stddef.h>
#include <stdint.h>

/* Bumped whenever a prototype below changes meaning. */
#define OVL_ABI_VERSION 6

/* ovl_tree flags */
#define OVL_TREE_KEEP_ROOT 1   /* remove only the contents of the directory */
#define OVL_TREE_COUNT_BYTES 2 /* account st_blocks*512 of what is removed */

/* ovl_mount_api_support() bits */
#define OVL_API_FSOPEN 1      /* fsopen/fsconfig/fsmount/move_mount work for overlay */
#define OVL_API_LOWERDIR_ADD 2 /* overlay accepts "lowerdir+" */
#define OVL_API_LOWERDIR_FD 4  /* "lowerdir+" also accepts a file descriptor */

struct ovl_tree_stats {
    uint64_t entries; /* directory entries removed or counted (root included) */
    uint64_t bytes;   /* st_blocks * 512, each inode once */
    uint64_t errors;  /* entries reported through the callback */
};

/* Called for every entry that could not be removed or read: a path relative
 * to the tree's root ("" for the root itself) and the errno.  May be called
 * from several threads at once. */
typedef void (*ovl_report_fn)(void *ctx, const char *path, int err);

int ovl_abi_version(void);
const char *ovl_source_hash(void);

int ovl_mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const char *data);
int ovl_umount2(const char *target, int flags);

/* mount(2) from a private working directory: a helper thread does
 * unshare(CLONE_FS) and chdir(cwd), so relative paths in data resolve
 * against cwd, and the process's own working directory never changes. */
int ovl_mount_at(const char *cwd, const char *source, const char *target,
                 const char *fstype, unsigned long flags, const char *data);

/* Overlay through the new mount API: one "lowerdir+" per layer (topmost
 * first), so the layer count is bounded by the kernel (500), not by a page
 * of options.  upper/work may be NULL (a read-only overlay).  options are
 * "key=value" or "flag" filesystem parameters; attrs are MOUNT_ATTR_* bits.
 * On failure the kernel's own messages land in log (NUL-terminated). */
int ovl_mount_overlay(const char *target, const char *const *lowers, size_t nlowers,
                      const char *upper, const char *work,
                      const char *const *options, size_t noptions,
                      unsigned int attrs, char *log, size_t loglen);

/* Bits of OVL_API_*; probes with fsopen() in a throwaway context. */
int ovl_mount_api_support(void);

/* Remove the tree at path (a directory), never following symlinks, never
 * crossing into another mount, never leaving path.  What cannot be removed
 * is reported through report; everything else is removed.  Returns 0 when
 * everything went, -1 with errno = the first error otherwise (stats are
 * filled either way).  nthreads > 1 removes independent subtrees in
 * parallel. */
int ovl_remove_tree(const char *path, int flags, int nthreads,
                    struct ovl_tree_stats *stats, ovl_report_fn report, void *ctx);

/* Disk usage of the tree at path: entries = distinct inodes (root
 * included), bytes = sum of st_blocks*512 over distinct inodes.  Does not
 * cross mounts.  *cancel (may be NULL) is polled; when it becomes non-zero
 * the walk stops with ECANCELED. */
int ovl_disk_usage(const char *path, int nthreads, const volatile int *cancel,
                   struct ovl_tree_stats *stats, ovl_report_fn report, void *ctx);

int ovl_renameat2(const char *oldpath, const char *newpath, unsigned int flags);
int ovl_syncfs(const char *path);
/* 1 when every entry of the directory reports a d_type, 0 when one is
 * DT_UNKNOWN, -1 on error.  An empty directory gets a probe file. */
int ovl_dir_has_dtype(const char *path);
int ovl_fs_magic(const char *path, int64_t *magic);

#endif
