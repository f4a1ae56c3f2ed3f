/*
 * relaymesh peer relay: the native forwarding loop (optional; relay/native.py builds and loads it).
 *
 * Why C here and nowhere else: on a bulk flow the Python loop spends ~40% of the relay thread's
 * time in the interpreter (perf, bench/paths), ~25 us per GRO receive once the endpoints have
 * evicted its caches, although the same code takes ~2 us in a warm loop; the kernel part (the
 * recvmsg and the GSO sendmsg) is the rest. This loop does only what the kernel fast path
 * (relay/kernel.py, nftables) does: forward the data packets of bound sessions, unmodified,
 * within each client's rate limit, and count them. Everything else -- control packets (the bind
 * handshake), unknown sessions, unbound sources, short packets -- goes back to Python, to the
 * sans-IO core, which stays the only place that decides what a session is.
 *
 * The tables are Python's (ctypes arrays, relay/native.py mirrors every struct below): the loop
 * thread rebuilds them between calls, so this code never sees them change under it. Counters
 * only grow here; Python moves them into the core (RelayServer.credit) and zeroes them between
 * calls, as it credits the kernel path's nft counters.
 *
 * Like the Python loop, it works in batches: up to RM_BATCH receives (each may hold a GRO run),
 * into RM_BATCH buffers of ctx->bufsize bytes back to back in ctx->buf, then the decisions, then
 * the sends. Runs leave as one GSO send each; consecutive single datagrams to one destination, of
 * one size (the last may be shorter), are gathered into one GSO send with an iovec per datagram,
 * so a sender that sends one datagram per syscall (wireguard-go) still reaches its peer in
 * batches, which its receiver takes with far fewer wake-ups.
 *
 * rm_run(ctx, deadline) blocks in poll() on the socket and the wake pipe and returns:
 *   RM_DEADLINE  CLOCK_MONOTONIC reached `deadline` (Python's expiry timer)
 *   RM_WAKE      the wake pipe is readable (stop, pause, a table change, a listing)
 *   RM_PASSUP    passup_*[0..npassup) are datagrams in ctx->buf for Python, each with its source
 *                (the rest of their batch was forwarded or rate-limited here)
 *   RM_ERROR     a receive or poll failed: ctx->err is the errno
 * It is called with the GIL released (ctypes does that), so the daemon's other threads run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define RM_SOL_UDP 17        /* IPPROTO_UDP as a socket option level */
#define RM_UDP_SEGMENT 103   /* <linux/udp.h>: GSO segment size for sendmsg */
#define RM_UDP_GRO 104       /* <linux/udp.h>: coalesced receives carry their segment size */
#define HEADER_LEN 8         /* relay/header.py: the Geneve-style header */
#define CONTROL_BIT 0x80     /* byte 1: for the relay itself, never forwarded */
#define GSO_MAX_SEGMENTS 64  /* UDP_MAX_SEGMENTS of older kernels */
#define GSO_MAX_BYTES 65000  /* one GSO send stays under the 64 KiB IP/UDP length limit */
#define RM_BATCH 64          /* receives per batch: relay/udp.py BATCH */
#define MAX_PASSUP 256       /* pass-ups per batch; a receive holds <= 64 segments (GRO_CNT_MAX) */
#define PASSUP_ROOM 64       /* a batch stops receiving when fewer slots than this are left */
#define MAX_OUT 256          /* decided sends held for gathering; a full list is sent early */
#define WAKE_CHECK_EVERY 4   /* batches between looks at the wake pipe under a flood */

enum { RM_DEADLINE = 0, RM_WAKE = 1, RM_PASSUP = 2, RM_ERROR = 3 };

struct rm_route {          /* one direction of a bound session */
    uint8_t src[16];       /* sender's bound address: IPv6, or IPv4-mapped (::ffff:a.b.c.d) */
    uint8_t dst[16];       /* the other side's bound address, same form */
    uint32_t sid;          /* session id (24 bits), header bytes 4..6 */
    uint16_t sport;        /* host byte order */
    uint16_t dport;
    int32_t bucket;        /* index into ctx->buckets: the sender's limits */
    int32_t pad;
    uint64_t packets;      /* decided to forward (as the core counts), not yet credited */
    uint64_t bytes;
    uint64_t rate_limited; /* dropped over the sender's limits, not yet credited */
};

struct rm_bucket {         /* token buckets of one client, as relay/session.py _Bucket */
    double pkt_tokens;
    double byte_tokens;
    double last;
};

struct rm_ctx {
    /* set by Python */
    int32_t fd;
    int32_t wake_fd;
    int32_t family;        /* AF_INET or AF_INET6: the socket's */
    int32_t gso;           /* UDP GSO sends allowed; cleared here when the kernel refuses one */
    double pps, bps, pkt_burst, byte_burst;
    struct rm_route *routes;
    int32_t nroutes;
    int32_t index_mask;    /* index has index_mask + 1 slots (a power of two), -1 = empty */
    int32_t *index;
    struct rm_bucket *buckets;
    uint8_t *buf;          /* RM_BATCH buffers of bufsize bytes */
    int32_t bufsize;
    /* the datagrams handed back with RM_PASSUP: offset into buf, length, source */
    int32_t npassup;
    int32_t err;
    int32_t passup_off[MAX_PASSUP];
    int32_t passup_len[MAX_PASSUP];
    uint16_t passup_port[MAX_PASSUP];
    uint8_t passup_addr[MAX_PASSUP][16];
    /* counters since Python last zeroed them */
    uint64_t receives, rx_packets, rx_bytes;
    uint64_t forwarded_packets, forwarded_bytes, forwarded_runs;
    uint64_t send_errors, passup_overflow;
    int32_t last_send_errno;
    int32_t pad2;
};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t route_hash(uint32_t sid, const uint8_t *addr, uint16_t port) {
    uint32_t h = 2166136261u ^ sid;  /* FNV-1a over the key */
    for (int i = 0; i < 16; i++) h = (h ^ addr[i]) * 16777619u;
    h = (h ^ (port & 0xff)) * 16777619u;
    h = (h ^ (port >> 8)) * 16777619u;
    return h;
}

/* Rebuild ctx->index from ctx->routes; Python calls it after changing the routes. */
int rm_index(struct rm_ctx *ctx) {
    int32_t size = ctx->index_mask + 1;
    if (size < 2 * ctx->nroutes) return -1;
    for (int32_t i = 0; i < size; i++) ctx->index[i] = -1;
    for (int32_t r = 0; r < ctx->nroutes; r++) {
        struct rm_route *rt = &ctx->routes[r];
        uint32_t i = route_hash(rt->sid, rt->src, rt->sport) & (uint32_t)ctx->index_mask;
        while (ctx->index[i] >= 0) i = (i + 1) & (uint32_t)ctx->index_mask;
        ctx->index[i] = r;
    }
    return 0;
}

static struct rm_route *lookup(struct rm_ctx *ctx, uint32_t sid, const uint8_t *addr,
                               uint16_t port) {
    if (ctx->nroutes == 0) return NULL;
    uint32_t i = route_hash(sid, addr, port) & (uint32_t)ctx->index_mask;
    for (;;) {
        int32_t r = ctx->index[i];
        if (r < 0) return NULL;
        struct rm_route *rt = &ctx->routes[r];
        if (rt->sid == sid && rt->sport == port && memcmp(rt->src, addr, 16) == 0) return rt;
        i = (i + 1) & (uint32_t)ctx->index_mask;
    }
}

/* Source address of a receive as the 16-byte form of the tables. */
static void source_of(const struct sockaddr_storage *ss, uint8_t *addr, uint16_t *port) {
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
        memset(addr, 0, 10);
        addr[10] = addr[11] = 0xff;
        memcpy(addr + 12, &s4->sin_addr, 4);
        *port = ntohs(s4->sin_port);
    } else {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        memcpy(addr, &s6->sin6_addr, 16);
        *port = ntohs(s6->sin6_port);
    }
}

static socklen_t dest_of(struct rm_ctx *ctx, const struct rm_route *rt,
                         struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (ctx->family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
        s4->sin_family = AF_INET;
        memcpy(&s4->sin_addr, rt->dst + 12, 4);
        s4->sin_port = htons(rt->dport);
        return sizeof *s4;
    }
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
    s6->sin6_family = AF_INET6;
    memcpy(&s6->sin6_addr, rt->dst, 16);
    s6->sin6_port = htons(rt->dport);
    return sizeof *s6;
}

static int gso_refused(int e) {
    return e == EINVAL || e == EIO || e == ENOPROTOOPT || e == EOPNOTSUPP;
}

struct out {               /* one decided send: a run (len > seg) or a single datagram */
    const struct rm_route *rt;
    uint8_t *p;
    int32_t len, seg;
};

struct batch {
    struct out out[MAX_OUT];
    int32_t nout;
};

static void count_sent(struct rm_ctx *ctx, int32_t packets, int32_t bytes) {
    ctx->forwarded_packets += (uint64_t)packets;
    ctx->forwarded_bytes += (uint64_t)bytes;
    if (packets > 1) ctx->forwarded_runs++;
}

static void send_error(struct rm_ctx *ctx, int e) {
    ctx->send_errors++;
    ctx->last_send_errno = e;
}

/* One sendmsg of `niov` buffers to `rt`'s destination; with `seg` the kernel cuts them into
 * datagrams of `seg` bytes (UDP GSO). Returns 0, or the errno. */
static int send_iov(struct rm_ctx *ctx, const struct rm_route *rt, struct iovec *iov, int niov,
                    int32_t seg) {
    struct sockaddr_storage ss;
    char cbuf[CMSG_SPACE(sizeof(uint16_t))];
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_name = &ss;
    m.msg_namelen = dest_of(ctx, rt, &ss);
    m.msg_iov = iov;
    m.msg_iovlen = (size_t)niov;
    if (seg) {
        memset(cbuf, 0, sizeof cbuf);
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = RM_SOL_UDP;
        c->cmsg_type = RM_UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t s16 = (uint16_t)seg;
        memcpy(CMSG_DATA(c), &s16, sizeof s16);
    }
    return sendmsg(ctx->fd, &m, 0) >= 0 ? 0 : errno;
}

/* Without GSO: one datagram per send. */
static void send_split(struct rm_ctx *ctx, const struct out *o, int n) {
    for (int i = 0; i < n; i++) {
        for (int32_t off = 0; off < o[i].len; off += o[i].seg) {
            int32_t len = o[i].len - off < o[i].seg ? o[i].len - off : o[i].seg;
            struct iovec iov = {o[i].p + off, (size_t)len};
            int e = send_iov(ctx, o[i].rt, &iov, 1, 0);
            if (e) send_error(ctx, e);
            else count_sent(ctx, 1, len);
        }
    }
}

/* Send the batch's decisions in order: a run as one GSO send; consecutive single datagrams to
 * one destination and of one size (a shorter one can only end the group) as one GSO send with
 * an iovec each. */
static void flush(struct rm_ctx *ctx, struct batch *b) {
    struct iovec iov[GSO_MAX_SEGMENTS];
    int i = 0;
    while (i < b->nout) {
        struct out *o = &b->out[i];
        int j = i + 1, niov = 1;
        int32_t size = o->len, total = o->len, packets = 1;
        iov[0].iov_base = o->p;
        iov[0].iov_len = (size_t)o->len;
        if (o->len > o->seg) {  /* a run from one GRO receive */
            size = o->seg;
            packets = (o->len + o->seg - 1) / o->seg;
        } else {
            int32_t limit = size ? GSO_MAX_BYTES / size : 1;
            if (limit > GSO_MAX_SEGMENTS) limit = GSO_MAX_SEGMENTS;
            while (j < b->nout && niov < limit) {
                struct out *q = &b->out[j];
                if (q->len > q->seg || q->len > size || q->len == 0 ||
                    memcmp(q->rt->dst, o->rt->dst, 16) != 0 || q->rt->dport != o->rt->dport)
                    break;
                iov[niov].iov_base = q->p;
                iov[niov].iov_len = (size_t)q->len;
                niov++;
                total += q->len;
                j++;
                if (q->len < size) break;  /* a shorter datagram can only end a group */
            }
            packets = niov;
        }
        if (packets == 1) {
            int e = send_iov(ctx, o->rt, iov, 1, 0);
            if (e) send_error(ctx, e);
            else count_sent(ctx, 1, total);
        } else if (!ctx->gso) {
            send_split(ctx, o, j - i);
        } else {
            int e = send_iov(ctx, o->rt, iov, niov, size);
            if (e && gso_refused(e)) {
                ctx->gso = 0;  /* the path cannot do GSO after all: plain sends from now on */
                send_split(ctx, o, j - i);
            } else if (e) {
                send_error(ctx, e);
            } else {
                count_sent(ctx, packets, total);
            }
        }
        i = j;
    }
    b->nout = 0;
}

static void passup(struct rm_ctx *ctx, int32_t off, int32_t len, const uint8_t *addr,
                   uint16_t port) {
    if (ctx->npassup >= MAX_PASSUP) {  /* cannot happen: a batch stops receiving before */
        ctx->passup_overflow++;
        return;
    }
    int32_t i = ctx->npassup++;
    ctx->passup_off[i] = off;
    ctx->passup_len[i] = len;
    ctx->passup_port[i] = port;
    memcpy(ctx->passup_addr[i], addr, 16);
}

static void decide(struct rm_ctx *ctx, struct batch *b, const struct rm_route *rt, uint8_t *p,
                   int32_t len, int32_t seg) {
    if (b->nout == MAX_OUT) flush(ctx, b);  /* sent early, still in order */
    b->out[b->nout++] = (struct out){rt, p, len, seg};
}

/* One receive at buf + base, `total` bytes in segments of `seg` from addr:port: decide what is
 * ours, list the rest for Python. */
static void handle(struct rm_ctx *ctx, struct batch *bt, int32_t base, int32_t total,
                   int32_t seg, const uint8_t *addr, uint16_t port, double now) {
    uint8_t *buf = ctx->buf + base;
    int32_t limit = seg ? GSO_MAX_BYTES / seg : 1;
    if (limit > GSO_MAX_SEGMENTS) limit = GSO_MAX_SEGMENTS;
    if (limit < 1) limit = 1;
    int32_t off = 0;
    while (off < total) {
        int32_t end = off + seg < total ? off + seg : total;
        uint8_t *p = buf + off;
        int32_t first = end - off;
        if (first < HEADER_LEN || (p[1] & CONTROL_BIT)) {
            passup(ctx, base + off, first, addr, port);
            off = end;
            continue;
        }
        /* a run: the following segments with this same header share one decision and one send */
        int32_t run_end = end, count = 1;
        while (run_end < total && count < limit && total - run_end >= HEADER_LEN &&
               memcmp(buf + run_end, p, HEADER_LEN) == 0) {
            run_end = run_end + seg < total ? run_end + seg : total;
            count++;
        }
        uint32_t sid = ((uint32_t)p[4] << 16) | ((uint32_t)p[5] << 8) | p[6];
        struct rm_route *rt = lookup(ctx, sid, addr, port);
        if (rt == NULL) {  /* not a bound session from here: the core counts why */
            for (int32_t o = off; o < run_end; o += seg)
                passup(ctx, base + o, run_end - o < seg ? run_end - o : seg, addr, port);
            off = run_end;
            continue;
        }
        ctx->rx_packets += (uint64_t)count;
        ctx->rx_bytes += (uint64_t)(run_end - off);
        /* the core's forward_run, to the letter: refill, then the whole run or a prefix */
        struct rm_bucket *b = &ctx->buckets[rt->bucket];
        double elapsed = now - b->last;
        if (elapsed > 0) {
            b->pkt_tokens += elapsed * ctx->pps;
            if (b->pkt_tokens > ctx->pkt_burst) b->pkt_tokens = ctx->pkt_burst;
            b->byte_tokens += elapsed * ctx->bps;
            if (b->byte_tokens > ctx->byte_burst) b->byte_tokens = ctx->byte_burst;
            b->last = now;
        }
        int32_t nbytes = run_end - off, n = count;
        if (!(b->pkt_tokens >= count && b->byte_tokens >= nbytes)) {
            double k = b->pkt_tokens;
            double kb = b->byte_tokens / (double)(first > 0 ? first : 1);
            if (kb < k) k = kb;
            if (k > count) k = count;
            n = k > 0 ? (int32_t)k : 0;
            rt->rate_limited += (uint64_t)(count - n);
            if (n < count) nbytes = n * first;
        }
        if (n > 0) {
            b->pkt_tokens -= n;
            b->byte_tokens -= nbytes;
            rt->packets += (uint64_t)n;
            rt->bytes += (uint64_t)nbytes;
            decide(ctx, bt, rt, p, n == count ? run_end - off : n * seg, seg);
        }
        off = run_end;
    }
}

int rm_run(struct rm_ctx *ctx, double deadline) {
    static __thread struct batch bt;  /* ~3 KiB, off the ctypes caller's stack */
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct sockaddr_storage ss;
    struct pollfd pfd[2] = {{ctx->fd, POLLIN, 0}, {ctx->wake_fd, POLLIN, 0}};
    unsigned batches = 0;
    uint8_t addr[16];
    uint16_t port;
    ctx->npassup = 0;
    bt.nout = 0;
    for (;;) {
        double now = mono();
        if (now >= deadline) return RM_DEADLINE;
        int got = 0, err = 0;
        while (got < RM_BATCH && ctx->npassup <= MAX_PASSUP - PASSUP_ROOM) {
            int32_t base = got * ctx->bufsize;
            struct iovec iov = {ctx->buf + base, (size_t)ctx->bufsize};
            struct msghdr m;
            memset(&m, 0, sizeof m);
            m.msg_name = &ss;
            m.msg_namelen = sizeof ss;
            m.msg_iov = &iov;
            m.msg_iovlen = 1;
            m.msg_control = cbuf;
            m.msg_controllen = sizeof cbuf;
            ssize_t n = recvmsg(ctx->fd, &m, MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK) err = errno;
                break;
            }
            got++;
            ctx->receives++;
            int32_t seg = (int32_t)n;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
                if (c->cmsg_level == RM_SOL_UDP && c->cmsg_type == RM_UDP_GRO) {
                    int g;
                    memcpy(&g, CMSG_DATA(c), sizeof g);
                    if (g > 0) seg = g;
                }
            source_of(&ss, addr, &port);
            if (n == 0) passup(ctx, base, 0, addr, port);  /* the shell counts it, empty */
            else handle(ctx, &bt, base, (int32_t)n, seg, addr, port, now);
        }
        flush(ctx, &bt);
        if (ctx->npassup) return RM_PASSUP;
        if (err) {
            ctx->err = err;
            return RM_ERROR;
        }
        if (got == RM_BATCH) {  /* more is waiting: a flood never lets poll() run, so look */
            if (++batches % WAKE_CHECK_EVERY == 0) {
                struct pollfd w = {ctx->wake_fd, POLLIN, 0};
                if (poll(&w, 1, 0) > 0) return RM_WAKE;
            }
            continue;
        }
        double wait_ms = (deadline - mono()) * 1000.0 + 1.0;
        int r = poll(pfd, 2, wait_ms > 1e6 ? 1000000 : wait_ms < 0 ? 0 : (int)wait_ms);
        if (r < 0 && errno != EINTR) {
            ctx->err = errno;
            return RM_ERROR;
        }
        if (r > 0 && (pfd[1].revents & POLLIN)) return RM_WAKE;
    }
}
