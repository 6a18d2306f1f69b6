"""Copies a GGUF model under another architecture name: `general.architecture` and every
`{arch}.` key prefix renamed, tensors unchanged. Gives the bad-input test a model llama.cpp loads
whose architecture the IAPT hook does not support.

Usage: rename_arch.py IN.gguf OUT.gguf NEW_ARCH"""
import struct
import sys

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def main(src, dst, new):
    b = open(src, "rb").read()
    assert b[:4] == b"GGUF", "not a GGUF file"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
    off = 24

    def string(o):
        (n,) = struct.unpack_from("<Q", b, o)
        return b[o + 8:o + 8 + n], o + 8 + n

    def value(t, o):
        if t == 8:
            return string(o)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", b, o)
            o += 12
            for _ in range(n):
                o = value(et, o)
            return o
        return o + SIZES[t]

    kvs, arch, align = [], None, 32
    for _ in range(n_kv):
        key, o = string(off)
        (t,) = struct.unpack_from("<I", b, o)
        end = value(t, o + 4)
        raw = b[o:end]
        if key == b"general.architecture":
            arch = string(o + 4)[0]
            raw = struct.pack("<IQ", 8, len(new)) + new
        if key == b"general.alignment":
            align = struct.unpack_from("<I", b, o + 4)[0]
        kvs.append((key, raw))
        off = end
    infos_start = off
    for _ in range(n_tensors):
        _, o = string(off)
        (nd,) = struct.unpack_from("<I", b, o)
        off = o + 4 + 8 * nd + 4 + 8
    infos = b[infos_start:off]
    data_start = (off + align - 1) // align * align
    out = bytearray(b[:4] + struct.pack("<IQQ", version, n_tensors, n_kv))
    for key, raw in kvs:
        if key.startswith(arch + b"."):
            key = new + key[len(arch):]
        out += struct.pack("<Q", len(key)) + key + raw
    out += infos
    out += b"\0" * ((-len(out)) % align)
    out += b[data_start:]
    open(dst, "wb").write(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].encode())
