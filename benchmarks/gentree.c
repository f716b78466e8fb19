/*
 * gentree: write the tree a plan describes, through the kernel, fast.
 *
 * bench_scale.py computes the shape (benchmarks/bench_scale.py: plan());
 * this program only executes it, so that hundreds of thousands of entries
 * cost seconds of system calls instead of minutes of Python.  It is run once
 * into an fscrypt-encrypted directory and once into an unencrypted one, and
 * both get the same tree: every name, size and content below follows from
 * the plan's numbers alone.
 *
 *   gentree ROOT < PLAN
 *
 * PLAN, one operation a line (ids are the plan's directory numbers; 0 is
 * ROOT itself):
 *
 *   D id parent name              mkdir parent/name (an existing one is fine)
 *   F dir count minlen maxlen seed sized   count files, names of minlen..maxlen
 *                                 bytes; small contents if sized is 1, empty if 0
 *   H dir src count               hard links in dir to the first count files of src
 *   S dir count maxlen seed       count symlinks, targets of 1..maxlen bytes
 *
 * Exit status 0 when every operation succeeded; the first failure is
 * reported with its line and ends the run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#define NAME_MAX_BYTES 255

struct dir {
	char *path;       /* relative to ROOT, "." for ROOT */
	long fcount;      /* the files of its F operation, for H */
	int fmin, fmax;
	uint64_t fseed;
};

static struct dir *dirs;
static long ndirs;
static long lineno;

static void die(const char *what, const char *arg)
{
	fprintf(stderr, "gentree: line %ld: %s %s: %s\n", lineno, what, arg ? arg : "",
		strerror(errno));
	exit(1);
}

/* splitmix64: every choice is a pure function of (seed, index). */
static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static const char FILL[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.";

/* Index in base 36, a '-', then filler up to the chosen length: the first
 * '-' delimits the index, so the names of one directory are distinct. */
static void make_name(char *out, const char *prefix, uint64_t seed, long idx, int minlen,
		      int maxlen)
{
	static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
	char rev[16];
	int n = 0, pos;
	uint64_t h = mix(seed ^ (uint64_t)idx * 0x100000001b3ULL);
	int len = minlen + (int)(h % (uint64_t)(maxlen - minlen + 1));
	unsigned long v = (unsigned long)idx;

	do {
		rev[n++] = digits[v % 36];
		v /= 36;
	} while (v);
	pos = (int)strlen(prefix);
	memcpy(out, prefix, (size_t)pos);
	while (n)
		out[pos++] = rev[--n];
	out[pos++] = '-';
	while (pos < len && pos < NAME_MAX_BYTES) {
		h = mix(h);
		out[pos++] = FILL[h % (sizeof(FILL) - 1)];
	}
	out[pos] = '\0';
}

/* 30% empty, 65% up to 2 KiB, 5% up to 16 KiB: mostly one block or none. */
static size_t file_size(uint64_t h)
{
	unsigned r = (unsigned)(h % 100);

	if (r < 30)
		return 0;
	if (r < 95)
		return 1 + (size_t)((h >> 8) % 2048);
	return 2049 + (size_t)((h >> 8) % (16384 - 2048));
}

static int open_dir(long id)
{
	int fd;

	if (id < 0 || id >= ndirs || !dirs[id].path) {
		errno = EINVAL;
		die("no such directory id", NULL);
	}
	fd = open(dirs[id].path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		die("open", dirs[id].path);
	return fd;
}

static void grow(long id)
{
	if (id < ndirs)
		return;
	long n = ndirs ? ndirs : 1024;
	while (n <= id)
		n *= 2;
	dirs = realloc(dirs, (size_t)n * sizeof(*dirs));
	if (!dirs)
		die("realloc", NULL);
	memset(dirs + ndirs, 0, (size_t)(n - ndirs) * sizeof(*dirs));
	ndirs = n;
}

static void op_mkdir(long id, long parent, const char *name)
{
	size_t len;
	int fd;

	grow(id);
	fd = open_dir(parent);
	if (mkdirat(fd, name, 0755) != 0 && errno != EEXIST)
		die("mkdir", name);
	close(fd);
	len = strlen(dirs[parent].path) + 1 + strlen(name) + 1;
	dirs[id].path = malloc(len);
	if (!dirs[id].path)
		die("malloc", NULL);
	snprintf(dirs[id].path, len, "%s/%s", dirs[parent].path, name);
}

static void op_files(long id, long count, int minlen, int maxlen, uint64_t seed, int sized)
{
	static unsigned char data[16384];
	char name[NAME_MAX_BYTES + 1];
	int dfd = open_dir(id);

	dirs[id].fcount = count;
	dirs[id].fmin = minlen;
	dirs[id].fmax = maxlen;
	dirs[id].fseed = seed;
	for (long i = 0; i < count; i++) {
		uint64_t h = mix(seed + 0x51ed27ULL * (uint64_t)(i + 1));
		size_t size = sized ? file_size(h) : 0, done = 0;
		int fd;

		make_name(name, "", seed, i, minlen, maxlen);
		fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd < 0)
			die("create", name);
		for (size_t k = 0; k < size; k += 8) {
			uint64_t w = mix(h + k);
			memcpy(data + k, &w, size - k < 8 ? size - k : 8);
		}
		while (done < size) {
			ssize_t n = write(fd, data + done, size - done);
			if (n < 0)
				die("write", name);
			done += (size_t)n;
		}
		if (i % 64 == 7) {
			char value[48];
			int vlen = 16 + (int)(h % 32);
			memset(value, 'v', sizeof(value));
			/* ext4 has user xattrs; a test's tmpfs before Linux 6.6 has not. */
			if (fsetxattr(fd, "user.note", value, (size_t)vlen, 0) != 0 &&
			    errno != EOPNOTSUPP)
				die("setxattr", name);
		}
		if (close(fd) != 0)
			die("close", name);
	}
	close(dfd);
}

static void op_links(long id, long src, long count)
{
	char name[NAME_MAX_BYTES + 1], link[NAME_MAX_BYTES + 2];
	int dfd = open_dir(id), sfd = open_dir(src);

	if (count > dirs[src].fcount) {
		errno = EINVAL;
		die("more links than files in", dirs[src].path);
	}
	for (long i = 0; i < count; i++) {
		make_name(name, "", dirs[src].fseed, i, dirs[src].fmin, dirs[src].fmax);
		snprintf(link, sizeof(link), "H%.*s", NAME_MAX_BYTES - 1, name);
		if (linkat(sfd, name, dfd, link, 0) != 0)
			die("link", link);
	}
	close(sfd);
	close(dfd);
}

static void op_symlinks(long id, long count, int maxlen, uint64_t seed)
{
	char name[NAME_MAX_BYTES + 1], target[4096];
	int dfd = open_dir(id);

	for (long i = 0; i < count; i++) {
		uint64_t h = mix(seed ^ ((uint64_t)i << 20));
		int len = 1 + (int)(h % (uint64_t)maxlen), pos = 0;

		while (pos + 3 <= len && (h >> (pos % 60)) % 3 == 0) {
			memcpy(target + pos, "../", 3);
			pos += 3;
		}
		while (pos < len) {
			h = mix(h);
			target[pos] = (pos % 9 == 8) ? '/' : FILL[h % (sizeof(FILL) - 1)];
			pos++;
		}
		target[len] = '\0';
		make_name(name, "L", seed, i, 4, 30);
		if (symlinkat(target, dfd, name) != 0)
			die("symlink", name);
	}
	close(dfd);
}

int main(int argc, char **argv)
{
	char line[1024], name[NAME_MAX_BYTES + 1];
	long a, b, c;
	int d, e, f;
	unsigned long long s;

	if (argc != 2) {
		fprintf(stderr, "usage: gentree ROOT < PLAN\n");
		return 2;
	}
	if (chdir(argv[1]) != 0)
		die("chdir", argv[1]);
	grow(0);
	dirs[0].path = strdup(".");
	while (fgets(line, sizeof(line), stdin)) {
		lineno++;
		switch (line[0]) {
		case 'D':
			if (sscanf(line, "D %ld %ld %255s", &a, &b, name) != 3)
				goto bad;
			if (a <= 0 || b < 0 || b >= ndirs || !dirs[b].path)
				goto bad;
			op_mkdir(a, b, name);
			break;
		case 'F':
			if (sscanf(line, "F %ld %ld %d %d %llu %d", &a, &b, &d, &e, &s, &f) != 6)
				goto bad;
			if (b < 0 || d < 1 || e < d || e > NAME_MAX_BYTES || (f != 0 && f != 1))
				goto bad;
			op_files(a, b, d, e, s, f);
			break;
		case 'H':
			if (sscanf(line, "H %ld %ld %ld", &a, &b, &c) != 3 || c < 0)
				goto bad;
			op_links(a, b, c);
			break;
		case 'S':
			if (sscanf(line, "S %ld %ld %d %llu", &a, &b, &d, &s) != 4)
				goto bad;
			if (b < 0 || d < 1 || d > 4000)
				goto bad;
			op_symlinks(a, b, d, s);
			break;
		case '\n':
		case '#':
			break;
		default:
			goto bad;
		}
	}
	if (ferror(stdin))
		die("read", "plan");
	return 0;
bad:
	errno = EINVAL;
	die("bad plan line", line);
	return 1;
}
