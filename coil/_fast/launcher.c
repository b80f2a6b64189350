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
 * Relay protocol (coild is the server; coil/cni/plugin.py is the pure-Python
 * twin of this client and must stay byte-for-byte compatible):
 *   request : "COIL1\n"
 *             "KEY=VALUE\0" for each of RELAY_ENV that is set
 *             "\0"                              (end of the environment)
 *             the whole stdin                   (then shutdown(SHUT_WR))
 *   response: ASCII decimal exit code (0..255), "\n", stdout bytes until EOF
 * The socket is the top-level "socket" key of the network configuration on
 * stdin (default DEFAULT_SOCKET). CNI_COMMAND=VERSION is answered here.
 *
 * Plain C99 + POSIX, libc only. Built by setup.py with
 *     cc -O2 -Wall -DCOIL_PYTHON="\"/path/to/python\"" launcher.c
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

/* ---- the constants; keep in step with coil/cni/spec.py and plugin.py ---- */

/* CNI spec versions this plugin speaks (spec.SUPPORTED_VERSIONS). */
#define SUPPORTED_VERSIONS "\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\""
#define DEFAULT_CNI_VERSION "1.1.0"
#define DEFAULT_SOCKET "/run/coild.sock"
#define RELAY_MAGIC "COIL1\n"
#define MAX_STDIN (16u * 1024u * 1024u)      /* larger stdin: ERR_DECODE */
#define MAX_RESPONSE (64u * 1024u * 1024u)   /* larger answer: malformed */
/* The runtime gives a CNI call 120 s. Connect (5 s) + answer (110 s) stay
 * under that and above coild's own 100 s request deadline, so coild gives
 * up (and rolls back) before we do, and we answer before the runtime kills
 * us. docs/cni.md, "Timeouts". */
#ifndef COIL_CONNECT_TIMEOUT_MS
#define COIL_CONNECT_TIMEOUT_MS 5000         /* coild must accept within */
#endif
#ifndef COIL_RELAY_TIMEOUT_MS
#define COIL_RELAY_TIMEOUT_MS 110000         /* coild must answer within */
#endif
#ifndef COIL_PYTHON
#define COIL_PYTHON "/usr/bin/python3"
#endif

/* CNI error codes (spec.ERR_*) */
#define ERR_IO 5
#define ERR_DECODE 6
#define NOT_AN_OBJECT "network configuration on stdin is not a JSON object"
#define ERR_TRY_AGAIN 11
#define ERR_NOT_AVAILABLE 50     /* STATUS: the plugin cannot serve (CNI 1.1) */

static const char *const RELAY_ENV[] = {
    "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
    "CNI_IFNAME", "CNI_ARGS", "CNI_PATH", NULL
};

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
        if (buf_reserve(b, 65536) < 0)
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
/* JSON scanner: validates the document the way Python's json.loads() does  */
/* and extracts the string values of two top-level keys, decoded.           */

#define JSON_MAX_DEPTH 1000
#define KEY_CAP 64            /* longer keys are never the ones we look for */
#define VALUE_CAP 4096

typedef struct {
    const unsigned char *p, *end;
    int depth;
    /* results */
    char socket[VALUE_CAP];
    size_t socket_len;
    int socket_set, socket_overflow;
    int is_object;                          /* the whole stdin is one JSON object */
    char version[VALUE_CAP];
    size_t version_len;
    int version_set, version_overflow;
} json_t;

static void skip_ws(json_t *j)
{
    while (j->p < j->end &&
           (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
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

static void put_byte(char *out, size_t cap, size_t *len, int *overflow,
                     unsigned char c)
{
    if (!out)
        return;
    if (*len < cap)
        out[*len] = (char)c;
    else
        *overflow = 1;
    (*len)++;
}

/* UTF-8 encode (lone surrogates too, like Python's "surrogatepass"). */
static void put_code_point(char *out, size_t cap, size_t *len, int *ovf,
                           unsigned cp)
{
    if (cp < 0x80) {
        put_byte(out, cap, len, ovf, (unsigned char)cp);
    } else if (cp < 0x800) {
        put_byte(out, cap, len, ovf, (unsigned char)(0xC0 | (cp >> 6)));
        put_byte(out, cap, len, ovf, (unsigned char)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        put_byte(out, cap, len, ovf, (unsigned char)(0xE0 | (cp >> 12)));
        put_byte(out, cap, len, ovf, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(out, cap, len, ovf, (unsigned char)(0x80 | (cp & 0x3F)));
    } else {
        put_byte(out, cap, len, ovf, (unsigned char)(0xF0 | (cp >> 18)));
        put_byte(out, cap, len, ovf, (unsigned char)(0x80 | ((cp >> 12) & 0x3F)));
        put_byte(out, cap, len, ovf, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(out, cap, len, ovf, (unsigned char)(0x80 | (cp & 0x3F)));
    }
}

/* Length of the valid UTF-8 sequence at p (surrogates allowed), 0 if none. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    size_t n;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    else if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) { n = 3; if (c == 0xE0) lo = 0xA0; }
    else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    if ((size_t)(end - p) < n)
        return 0;
    if (p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xBF)
            return 0;
    return n;
}

/* j->p at '"'. Scans the string, decoding it into out (may be NULL). */
static int scan_string(json_t *j, char *out, size_t cap, size_t *len, int *ovf)
{
    j->p++;
    while (j->p < j->end) {
        unsigned char c = *j->p;
        if (c == '"') {
            j->p++;
            return 0;
        }
        if (c < 0x20)
            return -1;                      /* control characters: invalid */
        if (c != '\\') {
            size_t n = utf8_len(j->p, j->end);
            if (n == 0)
                return -1;
            for (size_t i = 0; i < n; i++)
                put_byte(out, cap, len, ovf, j->p[i]);
            j->p += n;
            continue;
        }
        if (j->end - j->p < 2)
            return -1;
        c = j->p[1];
        j->p += 2;
        switch (c) {
        case '"': case '\\': case '/': put_byte(out, cap, len, ovf, c); break;
        case 'b': put_byte(out, cap, len, ovf, '\b'); break;
        case 'f': put_byte(out, cap, len, ovf, '\f'); break;
        case 'n': put_byte(out, cap, len, ovf, '\n'); break;
        case 'r': put_byte(out, cap, len, ovf, '\r'); break;
        case 't': put_byte(out, cap, len, ovf, '\t'); break;
        case 'u': {
            unsigned cp, lo;
            if (j->end - j->p < 4 || hex4(j->p, &cp) < 0)
                return -1;
            j->p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && j->end - j->p >= 6 &&
                j->p[0] == '\\' && j->p[1] == 'u' && hex4(j->p + 2, &lo) == 0 &&
                lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                j->p += 6;
            }
            put_code_point(out, cap, len, ovf, cp);
            break;
        }
        default:
            return -1;
        }
    }
    return -1;                              /* unterminated */
}

static int match_lit(json_t *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return -1;
    j->p += n;
    return 0;
}

static int is_digit(const json_t *j)
{
    return j->p < j->end && *j->p >= '0' && *j->p <= '9';
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)? and Python's extras
 * NaN, Infinity, -Infinity. */
static int scan_number(json_t *j)
{
    if (j->p < j->end && *j->p == '-') {
        j->p++;
        if (match_lit(j, "Infinity") == 0)
            return 0;
    }
    if (!is_digit(j))
        return -1;
    if (*j->p == '0')
        j->p++;
    else
        while (is_digit(j))
            j->p++;
    if (j->end - j->p >= 2 && *j->p == '.' && j->p[1] >= '0' && j->p[1] <= '9') {
        j->p++;
        while (is_digit(j))
            j->p++;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        const unsigned char *save = j->p;
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (!is_digit(j))
            j->p = save;        /* not an exponent: Python then fails on it */
        while (is_digit(j))
            j->p++;
    }
    return 0;
}

static int scan_value(json_t *j);

static int scan_container(json_t *j, int top)
{
    int object = *j->p == '{';
    unsigned char close = object ? '}' : ']';
    if (++j->depth > JSON_MAX_DEPTH)
        return -1;
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        j->depth--;
        return 0;
    }
    for (;;) {
        if (object) {
            char key[KEY_CAP];
            size_t klen = 0;
            int kovf = 0;
            if (j->p >= j->end || *j->p != '"')
                return -1;
            if (scan_string(j, top ? key : NULL, sizeof key, &klen, &kovf) < 0)
                return -1;
            skip_ws(j);
            if (j->p >= j->end || *j->p != ':')
                return -1;
            j->p++;
            skip_ws(j);
            int is_socket = top && !kovf && klen == 6 && !memcmp(key, "socket", 6);
            int is_version = top && !kovf && klen == 10 &&
                             !memcmp(key, "cniVersion", 10);
            if ((is_socket || is_version) && j->p < j->end && *j->p == '"') {
                /* the last occurrence wins, as in a Python dict */
                if (is_socket) {
                    j->socket_len = 0;
                    j->socket_overflow = 0;
                    if (scan_string(j, j->socket, VALUE_CAP, &j->socket_len,
                                    &j->socket_overflow) < 0)
                        return -1;
                    j->socket_set = 1;
                } else {
                    j->version_len = 0;
                    j->version_overflow = 0;
                    if (scan_string(j, j->version, VALUE_CAP, &j->version_len,
                                    &j->version_overflow) < 0)
                        return -1;
                    j->version_set = 1;
                }
            } else {
                if (is_socket)
                    j->socket_set = 0;      /* not a string: the default */
                if (is_version)
                    j->version_set = 0;
                if (scan_value(j) < 0)
                    return -1;
            }
        } else if (scan_value(j) < 0) {
            return -1;
        }
        skip_ws(j);
        if (j->p >= j->end)
            return -1;
        if (*j->p == close) {
            j->p++;
            j->depth--;
            return 0;
        }
        if (*j->p != ',')
            return -1;
        j->p++;
        skip_ws(j);
    }
}

static int scan_value(json_t *j)
{
    if (j->p >= j->end)
        return -1;
    switch (*j->p) {
    case '"': { size_t n = 0; int o = 0; return scan_string(j, NULL, 0, &n, &o); }
    case '{': case '[': return scan_container(j, 0);
    case 't': return match_lit(j, "true");
    case 'f': return match_lit(j, "false");
    case 'n': return match_lit(j, "null");
    case 'N': return match_lit(j, "NaN");
    case 'I': return match_lit(j, "Infinity");
    default: return scan_number(j);
    }
}

/* Parse the configuration; on any syntax error (or a top level that is not
 * an object) nothing is extracted, is_object is 0, and every command but
 * VERSION is answered with ERR_DECODE here: without a configuration the
 * socket of coild is unknown. Exactly like the Python twin. */
static void scan_config(json_t *j, const char *data, size_t len)
{
    memset(j, 0, sizeof *j);
    j->p = (const unsigned char *)data;
    j->end = j->p + len;
    if (len >= 3 && !memcmp(data, "\xEF\xBB\xBF", 3))
        j->p += 3;                          /* json.loads(bytes) skips a BOM */
    skip_ws(j);
    int ok = j->p < j->end && *j->p == '{' && scan_container(j, 1) == 0;
    if (ok) {
        skip_ws(j);
        ok = j->p == j->end;
    }
    j->is_object = ok;
    if (!ok) {
        j->socket_set = 0;
        j->version_set = 0;
    }
    if (j->socket_set && j->socket_len == 0)
        j->socket_set = 0;                  /* "" means the default */
    if (j->version_set && j->version_len == 0)
        j->version_set = 0;
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
        if (buf_reserve(b, 65536) < 0)
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
    json_t *j;
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

    j = malloc(sizeof *j);
    if (!j) {
        fputs("hypercoil: out of memory\n", stderr);
        return 1;
    }
    scan_config(j, in.data ? in.data : "", in.len);
    if (j->version_set) {
        g_version = j->version;
        g_version_len = j->version_len < VALUE_CAP ? j->version_len : VALUE_CAP;
    }
    const char *path = DEFAULT_SOCKET;
    size_t path_len = strlen(DEFAULT_SOCKET);
    if (j->socket_set) {
        path = j->socket;
        path_len = j->socket_len < VALUE_CAP ? j->socket_len : VALUE_CAP;
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

    if (!j->is_object)
        return cni_error(ERR_DECODE, NOT_AN_OBJECT, sizeof NOT_AN_OBJECT - 1, "");

    /* coild out of reach: STATUS answers 50 (the plugin cannot serve, the
       runtime marks the node not ready); every other command 11 (retry) */
    const int unreachable = command && strcmp(command, "STATUS") == 0
                            ? ERR_NOT_AVAILABLE : ERR_TRY_AGAIN;

    /* connect */
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    int fd = -1, err = 0;
    if (j->socket_overflow || path_len > sizeof addr.sun_path) {
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
