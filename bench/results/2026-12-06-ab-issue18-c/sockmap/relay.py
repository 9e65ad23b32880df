#!/usr/bin/env python3
"""EXPERIMENT, not product code: a WebSocket relay that forwards in the kernel.

Python does each connection's upgrade (reads the request, connects to the
backend, sends it, reads the 101, sends it back), then puts both sockets in
a BPF SOCKHASH whose stream-verdict program redirects every skb that arrives
on one socket to the other socket's egress. After that no userspace code
runs per message. Used only to price the kernel's own forwarding path on
this machine against a userspace proxy.

usage: relay.py LISTEN_PORT BACKEND_PORT
"""
import ctypes, os, socket, struct, sys

libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = 321
libc.syscall.restype = ctypes.c_long

def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(NR_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf cmd {cmd}: {os.strerror(e)}")
    return r

BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
MAP_SOCKHASH, PROG_SK_SKB, ATTACH_STREAM_VERDICT = 18, 14, 5

def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack('<BBhi', code, (src << 4) | dst, off, imm)

def main():
    lport, bport = int(sys.argv[1]), int(sys.argv[2])
    mfd = bpf(BPF_MAP_CREATE, struct.pack('<IIIII', MAP_SOCKHASH, 8, 4, 65536, 0))
    prog = b''.join([
        insn(0xbf, 6, 1),                 # r6 = ctx
        insn(0x61, 2, 6, 136),            # r2 = skb->local_port
        insn(0x63, 10, 2, -8),            # key[0] = r2
        insn(0x61, 2, 6, 132),            # r2 = skb->remote_port
        insn(0x63, 10, 2, -4),            # key[1] = r2
        insn(0xbf, 1, 6),                 # r1 = ctx
        insn(0x18, 2, 1, 0, mfd), insn(0),  # r2 = map (pseudo map fd)
        insn(0xbf, 3, 10),                # r3 = fp
        insn(0x07, 3, 0, 0, -8),          # r3 -= 8
        insn(0xb7, 4, 0, 0, 0),           # r4 = 0: egress
        insn(0x85, 0, 0, 0, 72),          # bpf_sk_redirect_hash
        insn(0x95),
    ])
    pbuf = ctypes.create_string_buffer(prog)
    lic = ctypes.create_string_buffer(b'GPL')
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack('<IIQQIIQ', PROG_SK_SKB, len(prog) // 8, ctypes.addressof(pbuf),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log))
    try:
        pfd = bpf(BPF_PROG_LOAD, attr)
    except OSError:
        print(log.value.decode(), file=sys.stderr)
        raise
    bpf(BPF_PROG_ATTACH, struct.pack('<IIIII', mfd, pfd, ATTACH_STREAM_VERDICT, 0, 0))

    def key(s):
        lp = s.getsockname()[1]
        rp = s.getpeername()[1]
        return struct.pack('<II', lp, socket.htons(rp) << 16)

    def put(k, s):
        kb = ctypes.create_string_buffer(k)
        vb = ctypes.create_string_buffer(struct.pack('<I', s.fileno()))
        bpf(BPF_MAP_UPDATE_ELEM, struct.pack('<IIQQQ', mfd, 0, ctypes.addressof(kb), ctypes.addressof(vb), 0))

    def head(s):
        b = b''
        while b'\r\n\r\n' not in b:
            c = s.recv(4096)
            if not c:
                return None
            b += c
        assert b.endswith(b'\r\n\r\n'), "bytes after the head"
        return b

    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(('127.0.0.1', lport))
    ls.listen(4096)
    keep = []
    print('ready', flush=True)
    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = head(c)
        if req is None:
            c.close(); continue
        b = socket.create_connection(('127.0.0.1', bport))
        b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        b.sendall(req)
        resp = head(b)
        put(key(c), b)   # data arriving on c goes out on b
        put(key(b), c)
        c.sendall(resp)
        keep.append((c, b))
        if len(keep) > 20000:
            keep.pop(0)

main()
