/*
 * hypercoil: the native launcher of coil.
 *
 * Called as "coil" (basename of argv[0], e.g. the /opt/cni/bin/coil symlink,
 * or as "hypercoil coil") it is the CNI plugin: it relays the CNI request to
 * the node daemon coild over its UNIX socket and prints coild's answer.
 * Python is never started for that; a CNI call costs about a millisecond.
 *
 * For every other role it execs Python:
 *     PYTHON -m coil ROLE ARGS...
 * (PYTHON: the interpreter of the install it sits in, else COIL_PYTHON;
 * see python_path()),
 * where ROLE is the basename of argv[0] when that is one of ROLE_NAMES,
 * otherwise argv[1..] are passed as they are ("hypercoil coilctl pool list").
 *
 * It is a plain relay of the protocol of coil/cni/protocol.py (the one
 * owner of the framing and the constants; coil/cni/plugin.py is the
 * pure-Python twin of this client and must stay byte-for-byte compatible):
 * it finds the top-level "socket" (and "cniVersion", for its own error
 * objects) of the network configuration on stdin with a minimal scan,
 * sends the CNI_* environment and stdin to coild and prints its answer.
 * coild validates everything; CNI_COMMAND=VERSION is answered here.
 *
 * Plain C99 + POSIX, libc only. Built by setup.py, which first writes
 * protocol.h (coil/cni/protocol.py c_header()) into its build directory:
 *     cc -O2 -Wall -I BUILD -DCOIL_PYTHON="\"/path/to/python\"" launcher.c
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The relay protocol's constants (RELAY_MAGIC, RELAY_ENV_KEYS,
 * SUPPORTED_VERSIONS, DEFAULT_CNI_VERSION, DEFAULT_SOCKET, MAX_STDIN,
 * MAX_RESPONSE, COIL_CONNECT_TIMEOUT_MS, COIL_RELAY_TIMEOUT_MS) and the CNI
 * error codes used here (ERR_IO, ERR_DECODE, ERR_TRY_AGAIN,
 * ERR_NOT_AVAILABLE): generated from coil/cni/protocol.py by setup.py
 * (protocol.c_header()), never spelled here. */
#include "protocol.h"

#ifndef COIL_PYTHON
#define COIL_PYTHON "/usr/bin/python3"
#endif

static const char *const RELAY_ENV[] = { RELAY_ENV_KEYS, NULL };

/* argv[0] basenames that select a Python role by themselves */
static const char *const ROLE_NAMES[] = {
    "coild", "coilctl", "coil-controller", "coil-installer", "sandbox", NULL
};

#define DETAILS_START "start coild on this node or fix the 'socket' key " \
                      "of the network configuration"

/* ------------------------------------------------------------------------ */
/* small buffers                                                            */

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

static int buf_reserve(buf_t *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra) {
        if (cap > ((size_t)-1) / 2)
            return -1;
        cap *= 2;
    }
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

/* Free room wanted before each read into b: 64 KiB at first, then 4 KiB.
 * Asking 64 KiB again for the read that only sees EOF doubled the buffer
 * (a second mmap, a copy, an munmap and their page faults) on every call. */
#define READ_ROOM(b) ((b)->len ? (size_t)4096 : (size_t)65536)

static int buf_put(buf_t *b, const void *p, size_t n)
{
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

static int buf_puts(buf_t *b, const char *s) { return buf_put(b, s, strlen(s)); }

/* Append s (n bytes) as the inside of a JSON string; the same escapes as
 * Python's json.dumps(..., ensure_ascii=False). */
static int buf_put_json(buf_t *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[7];
        const char *out = esc;
        size_t len = 2;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            if (c < 0x20) {
                esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
                esc[4] = hex[c >> 4]; esc[5] = hex[c & 15];
                len = 6;
            } else {
                out = (const char *)&s[i];
                len = 1;
            }
        }
        if (buf_put(b, out, len) < 0)
            return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* I/O helpers: EINTR and partial writes                                     */

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read fd to EOF into b; stops with E2BIG once more than max bytes came. */
static int read_all(int fd, buf_t *b, size_t max)
{
    for (;;) {
        if (buf_reserve(b, READ_ROOM(b)) < 0)
            return -1;
        ssize_t r = read(fd, b->data + b->len, b->cap - b->len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            return 0;
        b->len += (size_t)r;
        if (b->len > max) {
            errno = E2BIG;
            return -1;
        }
    }
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for events or the deadline passed (ETIMEDOUT). */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd pfd = { .fd = fd, .events = events, .revents = 0 };
        int r = poll(&pfd, 1, left > 60000 ? 60000 : (int)left);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r > 0)
            return 0;   /* ready, or POLLERR/POLLHUP: the next call says */
    }
}

/* ------------------------------------------------------------------------ */
/* The minimal scan: the last top-level "socket" and "cniVersion" string    */
/* values, decoded. No validation (coild parses and checks the document);   */
/* the rules are those of coil/cni/protocol.py scan_netconf(), which the    */
/* pure-Python plugin uses.                                                 */

typedef struct {
    const unsigned char *p, *end;
} scan_t;

typedef struct {
    char *data;                 /* decoded value, malloc'd; NULL: not found */
    size_t len;
} value_t;

static void skip_ws(scan_t *s)
{
    while (s->p < s->end &&
           (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    *out = v;
    return 0;
}

/* Append byte c to out (cap bytes; out may be NULL: count only). */
static void put_byte(char *out, size_t cap, size_t *len, unsigned char c)
{
    if (out && *len < cap)
        out[*len] = (char)c;
    (*len)++;
}

/* UTF-8 encode (lone surrogates too, like Python's "surrogatepass"). */
static void put_code_point(char *out, size_t cap, size_t *len, unsigned cp)
{
    if (cp < 0x80) {
        put_byte(out, cap, len, (unsigned char)cp);
    } else if (cp < 0x800) {
        put_byte(out, cap, len, (unsigned char)(0xC0 | (cp >> 6)));
        put_byte(out, cap, len, (unsigned char)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        put_byte(out, cap, len, (unsigned char)(0xE0 | (cp >> 12)));
        put_byte(out, cap, len, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(out, cap, len, (unsigned char)(0x80 | (cp & 0x3F)));
    } else {
        put_byte(out, cap, len, (unsigned char)(0xF0 | (cp >> 18)));
        put_byte(out, cap, len, (unsigned char)(0x80 | ((cp >> 12) & 0x3F)));
        put_byte(out, cap, len, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(out, cap, len, (unsigned char)(0x80 | (cp & 0x3F)));
    }
}

/* s->p at '"': decode the string into out (NULL: only its length in *len),
 * leave s->p after the closing quote. Other bytes are copied as they are.
 * -1 for an unknown escape or a missing closing quote. */
static int scan_string(scan_t *s, char *out, size_t cap, size_t *len)
{
    *len = 0;
    s->p++;
    while (s->p < s->end) {
        unsigned char c = *s->p++;
        if (c == '"')
            return 0;
        if (c != '\\') {
            put_byte(out, cap, len, c);
            continue;
        }
        if (s->p >= s->end)
            return -1;
        c = *s->p++;
        switch (c) {
        case '"': case '\\': case '/': put_byte(out, cap, len, c); break;
        case 'b': put_byte(out, cap, len, '\b'); break;
        case 'f': put_byte(out, cap, len, '\f'); break;
        case 'n': put_byte(out, cap, len, '\n'); break;
        case 'r': put_byte(out, cap, len, '\r'); break;
        case 't': put_byte(out, cap, len, '\t'); break;
        case 'u': {
            unsigned cp, lo;
            if (s->end - s->p < 4 || hex4(s->p, &cp) < 0)
                return -1;
            s->p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && s->end - s->p >= 6 &&
                s->p[0] == '\\' && s->p[1] == 'u' && hex4(s->p + 2, &lo) == 0 &&
                lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                s->p += 6;
            }
            put_code_point(out, cap, len, cp);
            break;
        }
        default:
            return -1;
        }
    }
    return -1;
}

/* Skip a value that is not a string: up to the ',' or the '}' that ends it
 * at the top level (strings and nested brackets are stepped over). */
static void skip_value(scan_t *s)
{
    int depth = 0;
    while (s->p < s->end) {
        unsigned char c = *s->p;
        if (c == '"') {
            size_t n;
            if (scan_string(s, NULL, 0, &n) < 0) {
                s->p = s->end;
                return;
            }
            continue;
        }
        if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (depth == 0)
                return;
            depth--;
        } else if (c == ',' && depth == 0) {
            return;
        }
        s->p++;
    }
}

/* Decode the string at s->p into a new value (the last one wins). */
static int take_string(scan_t *s, value_t *v)
{
    const unsigned char *start = s->p;
    size_t len, len2;
    if (scan_string(s, NULL, 0, &len) < 0)
        return -1;
    char *data = malloc(len + 1);
    if (!data)
        return -1;
    s->p = start;
    scan_string(s, data, len, &len2);
    free(v->data);
    v->data = data;
    v->len = len;
    return 0;
}

/* The top-level members of the object on stdin; stops quietly at the first
 * thing that is not a member (a broken document keeps what came before). */
static void scan_netconf(const char *data, size_t len, value_t *sock, value_t *version)
{
    scan_t s = { (const unsigned char *)data, (const unsigned char *)data + len };
    if (len >= 3 && !memcmp(data, "\xEF\xBB\xBF", 3))
        s.p += 3;                           /* a UTF-8 BOM, as json.loads skips */
    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{')
        return;
    s.p++;
    for (;;) {
        char key[16];
        size_t klen;
        skip_ws(&s);
        if (s.p >= s.end || *s.p != '"' || scan_string(&s, key, sizeof key, &klen) < 0)
            return;
        skip_ws(&s);
        if (s.p >= s.end || *s.p != ':')
            return;
        s.p++;
        skip_ws(&s);
        value_t *want = klen == 6 && !memcmp(key, "socket", 6) ? sock
                      : klen == 10 && !memcmp(key, "cniVersion", 10) ? version : NULL;
        if (want && s.p < s.end && *s.p == '"') {
            if (take_string(&s, want) < 0)
                return;
        } else {
            if (want) {                     /* not a string: the default */
                free(want->data);
                want->data = NULL;
                want->len = 0;
            }
            skip_value(&s);
        }
        skip_ws(&s);
        if (s.p >= s.end || *s.p != ',')
            return;
        s.p++;
    }
}

/* The text of an errno value as glibc (and so Python's os.strerror, which
 * the pure-Python twin prints) words it: the launcher is linked statically
 * against musl where musl-gcc exists (setup.py), whose wording differs for
 * these. */
static const char *error_text(int err)
{
    switch (err) {
    case EIO: return "Input/output error";
    case ENOMEM: return "Cannot allocate memory";
    case EMFILE: return "Too many open files";
    case ENAMETOOLONG: return "File name too long";
    case ELOOP: return "Too many levels of symbolic links";
    case ENOTSOCK: return "Socket operation on non-socket";
    case EADDRINUSE: return "Address already in use";
    case EADDRNOTAVAIL: return "Cannot assign requested address";
    case ENETUNREACH: return "Network is unreachable";
    case ECONNABORTED: return "Software caused connection abort";
    case ENOTCONN: return "Transport endpoint is not connected";
    case ETIMEDOUT: return "Connection timed out";
    case EHOSTUNREACH: return "No route to host";
    default: return strerror(err);
    }
}

/* ------------------------------------------------------------------------ */
/* the CNI plugin role                                                      */

static const char *g_version = DEFAULT_CNI_VERSION;
static size_t g_version_len = sizeof DEFAULT_CNI_VERSION - 1;

/* Write the answer to stdout: 0, or 1 with a note on stderr. */
static int emit(const char *p, size_t n)
{
    if (write_all(STDOUT_FILENO, p, n) < 0) {
        fprintf(stderr, "hypercoil: cannot write the answer: %s\n", error_text(errno));
        return 1;
    }
    return 0;
}

/* Print a CNI error object on stdout; returns the exit code 1. */
static int cni_error(int code, const char *msg, size_t msg_len, const char *details)
{
    buf_t b = {0};
    char num[16];
    snprintf(num, sizeof num, "%d", code);
    if (buf_puts(&b, "{\"cniVersion\":\"") < 0 ||
        buf_put_json(&b, g_version, g_version_len) < 0 ||
        buf_puts(&b, "\",\"code\":") < 0 || buf_puts(&b, num) < 0 ||
        buf_puts(&b, ",\"msg\":\"") < 0 || buf_put_json(&b, msg, msg_len) < 0 ||
        buf_puts(&b, "\",\"details\":\"") < 0 ||
        buf_put_json(&b, details, strlen(details)) < 0 ||
        buf_puts(&b, "\"}\n") < 0) {
        fputs("hypercoil: out of memory\n", stderr);
        return 1;
    }
    emit(b.data, b.len);
    free(b.data);
    return 1;
}

/* "<prefix><socket path><suffix>" as an error message */
static int socket_error(int code, const char *prefix, const char *path,
                        size_t path_len, const char *suffix, const char *details)
{
    buf_t m = {0};
    if (buf_puts(&m, prefix) < 0 || buf_put(&m, path, path_len) < 0 ||
        buf_puts(&m, suffix) < 0) {
        fputs("hypercoil: out of memory\n", stderr);
        return 1;
    }
    cni_error(code, m.data, m.len, details);
    free(m.data);
    return 1;
}

static int send_all(int fd, const char *p, size_t n, long long deadline)
{
    while (n > 0) {
        if (wait_fd(fd, POLLOUT, deadline) < 0)
            return -1;
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int recv_all(int fd, buf_t *b, long long deadline)
{
    for (;;) {
        if (buf_reserve(b, READ_ROOM(b)) < 0)
            return -1;
        if (wait_fd(fd, POLLIN, deadline) < 0)
            return -1;
        ssize_t r = recv(fd, b->data + b->len, b->cap - b->len, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            /* coild closed with part of our request unread (it answered
             * early): the kernel delivers all queued data first, so this
             * is the end of the answer */
            if (errno == ECONNRESET)
                return 0;
            return -1;
        }
        if (r == 0)
            return 0;
        b->len += (size_t)r;
        if (b->len > MAX_RESPONSE) {
            errno = EMSGSIZE;
            return -1;
        }
    }
}

static int cni_main(void)
{
    buf_t in = {0};
    value_t sock = {0}, version = {0};
    char msg[256];

    signal(SIGPIPE, SIG_IGN);               /* EPIPE instead; no exec follows */

    if (read_all(STDIN_FILENO, &in, MAX_STDIN) < 0) {
        if (errno == E2BIG)
            snprintf(msg, sizeof msg, "network configuration on stdin is "
                     "larger than %u MiB", MAX_STDIN >> 20);
        else
            snprintf(msg, sizeof msg, "cannot read the network configuration "
                     "from stdin: %s", error_text(errno));
        return cni_error(errno == E2BIG ? ERR_DECODE : ERR_IO, msg, strlen(msg), "");
    }

    /* "" or not a string: the defaults; coild checks the rest */
    scan_netconf(in.data ? in.data : "", in.len, &sock, &version);
    if (version.len) {
        g_version = version.data;
        g_version_len = version.len;
    }
    const char *path = DEFAULT_SOCKET;
    size_t path_len = strlen(DEFAULT_SOCKET);
    if (sock.len) {
        path = sock.data;
        path_len = sock.len;
    }

    const char *command = getenv("CNI_COMMAND");
    if (command && strcmp(command, "VERSION") == 0) {
        buf_t b = {0};
        if (buf_puts(&b, "{\"cniVersion\":\"") < 0 ||
            buf_put_json(&b, g_version, g_version_len) < 0 ||
            buf_puts(&b, "\",\"supportedVersions\":[" SUPPORTED_VERSIONS "]}\n") < 0)
            return 1;
        return emit(b.data, b.len);
    }

    /* coild out of reach: STATUS answers 50 (the plugin cannot serve, the
       runtime marks the node not ready); every other command 11 (retry) */
    const int unreachable = command && strcmp(command, "STATUS") == 0
                            ? ERR_NOT_AVAILABLE : ERR_TRY_AGAIN;

    /* connect */
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    int fd = -1, err = 0;
    if (path_len > sizeof addr.sun_path) {
        err = ENAMETOOLONG;
    } else {
        memcpy(addr.sun_path, path, path_len);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && fd <= STDERR_FILENO) {
            /* stdout or stderr is closed: keep the socket off those fds */
            int high = fcntl(fd, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
            close(fd);
            fd = high;
        }
        if (fd < 0) {
            err = errno;
        } else {
            /* a full listen queue must not block us for ever either */
            struct timeval tv = { COIL_CONNECT_TIMEOUT_MS / 1000,
                                  (COIL_CONNECT_TIMEOUT_MS % 1000) * 1000 };
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len);
            while (connect(fd, (struct sockaddr *)&addr, alen) < 0) {
                if (errno == EINTR)
                    continue;
                err = errno;
                break;
            }
        }
    }
    if (err) {
        snprintf(msg, sizeof msg, ": %s", error_text(err));
        return socket_error(unreachable, "coild is not reachable at ", path,
                            path_len, msg, DETAILS_START);
    }
    long long deadline = now_ms() + COIL_RELAY_TIMEOUT_MS;

    /* request */
    buf_t req = {0};
    int oom = buf_puts(&req, RELAY_MAGIC);
    for (int i = 0; RELAY_ENV[i]; i++) {
        const char *v = getenv(RELAY_ENV[i]);
        if (!v)
            continue;
        oom |= buf_puts(&req, RELAY_ENV[i]);
        oom |= buf_put(&req, "=", 1);
        oom |= buf_put(&req, v, strlen(v) + 1);     /* with its '\0' */
    }
    oom |= buf_put(&req, "", 1);
    if (oom) {
        fputs("hypercoil: out of memory\n", stderr);
        return 1;
    }
    if (send_all(fd, req.data, req.len, deadline) < 0 ||
        send_all(fd, in.data, in.len, deadline) < 0) {
        /* coild may have answered and closed early: read what it said */
        if (errno == ETIMEDOUT)
            goto timeout;
    }
    shutdown(fd, SHUT_WR);
    free(req.data);
    free(in.data);

    /* response */
    buf_t resp = {0};
    if (recv_all(fd, &resp, deadline) < 0) {
        if (errno == ETIMEDOUT)
            goto timeout;
        if (errno != EMSGSIZE) {
            snprintf(msg, sizeof msg, ": %s", error_text(errno));
            return socket_error(unreachable, "lost the connection to coild at ",
                                path, path_len, msg, "");
        }
        resp.len = 0;                       /* too large: malformed */
    }
    close(fd);
    size_t digits = 0;
    int code = 0;
    while (digits < resp.len && digits < 4 &&
           resp.data[digits] >= '0' && resp.data[digits] <= '9') {
        code = code * 10 + (resp.data[digits] - '0');
        digits++;
    }
    if (digits == 0 || digits > 3 || code > 255 || digits >= resp.len ||
        resp.data[digits] != '\n')
        return socket_error(unreachable, "malformed answer from coild at ",
                            path, path_len, "", "the answer must start with "
                            "the exit code and a newline; check the coild log");
    size_t skip = digits + 1;
    return emit(resp.data + skip, resp.len - skip) ? 1 : code;

timeout:
    snprintf(msg, sizeof msg, " did not answer within %d s",
             COIL_RELAY_TIMEOUT_MS / 1000);
    return socket_error(unreachable, "coild at ", path, path_len, msg,
                        "coild may be overloaded or hung; check the coild log");
}

/* ------------------------------------------------------------------------ */

/* The interpreter to exec for the Python roles. Installed from a wheel, the
 * launcher sits at PREFIX/lib[64]/pythonX.Y/{site,dist}-packages/coil/_fast/
 * and that install's interpreter is PREFIX/bin/pythonX.Y (a venv's bin/ is
 * its prefix's bin/): the wheel may have been built by another interpreter,
 * so the COIL_PYTHON baked in at build time is only the fallback (an
 * in-place build in a checkout, or a prefix without that interpreter). */
static const char *python_path(void)
{
    static char buf[4096];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 32);
    if (n <= 0)
        return COIL_PYTHON;
    buf[n] = '\0';
    char *part[6];                        /* the last six '/' of the path */
    int k = 0;
    for (char *p = buf + n - 1; p > buf && k < 6; p--)
        if (*p == '/')
            part[k++] = p;
    if (k < 6 || strcmp(part[0], "/hypercoil") != 0 ||
        strncmp(part[1], "/_fast/", 7) != 0 || strncmp(part[2], "/coil/", 6) != 0 ||
        (strncmp(part[3], "/site-packages/", 15) != 0 &&
         strncmp(part[3], "/dist-packages/", 15) != 0) ||
        strncmp(part[4], "/python3.", 9) != 0 ||
        (strncmp(part[5], "/lib/", 5) != 0 && strncmp(part[5], "/lib64/", 7) != 0))
        return COIL_PYTHON;
    char version[16];                     /* "python3.Y" */
    size_t vlen = (size_t)(part[3] - part[4] - 1);
    if (vlen >= sizeof version)
        return COIL_PYTHON;
    memcpy(version, part[4] + 1, vlen);
    version[vlen] = '\0';
    snprintf(part[5], sizeof buf - (size_t)(part[5] - buf), "/bin/%s", version);
    return access(buf, X_OK) == 0 ? buf : COIL_PYTHON;
}

int main(int argc, char **argv)
{
    const char *arg0 = argc > 0 && argv[0] ? argv[0] : "hypercoil";
    const char *name = strrchr(arg0, '/');
    name = name ? name + 1 : arg0;

    /* "coil --version" is for humans (a runtime passes no arguments):
       Python answers it, like every role's --version */
    const char *role = NULL;
    if (strcmp(name, "coil") == 0) {
        if (argc < 2 || strcmp(argv[1], "--version") != 0)
            return cni_main();
        role = "coil";
    }
    for (int i = 0; !role && ROLE_NAMES[i]; i++)
        if (strcmp(name, ROLE_NAMES[i]) == 0)
            role = ROLE_NAMES[i];
    if (!role && argc > 1 && strcmp(argv[1], "coil") == 0
            && !(argc > 2 && strcmp(argv[2], "--version") == 0))
        return cni_main();                  /* "hypercoil coil" */

    char **args = calloc((size_t)argc + 5, sizeof *args);
    if (!args) {
        fputs("hypercoil: out of memory\n", stderr);
        return 127;
    }
    int n = 0;
    const char *python = python_path();
    args[n++] = (char *)python;
    args[n++] = "-m";
    args[n++] = "coil";
    if (role)
        args[n++] = (char *)role;
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    execv(python, args);
    fprintf(stderr, "hypercoil: cannot start %s: %s\n", python, error_text(errno));
    return 127;
}
