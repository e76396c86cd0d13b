"""Checks shared by the wrappers of the 16-byte-load kernel versions (x128 in
kernels/common.cuh): a packet holds 16 // itemsize elements (4 floats, 8 bf16),
so the element count must be a multiple of that and every array's first
element 16-byte aligned (CuPy's and NumPy's fresh allocations are; a slice at
an odd offset may not be)."""


def address(a) -> int:
    """The device (cupy) or host (numpy) address of a's first element."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def overlaps(a, b) -> bool:
    """Whether two contiguous arrays (device or host) share any byte."""
    lo_a, lo_b = address(a), address(b)
    return a.nbytes > 0 and b.nbytes > 0 and lo_a < lo_b + b.nbytes and lo_b < lo_a + a.nbytes


def packet_size(a) -> int:
    return 16 // a.dtype.itemsize


def check_vectorized(fn: str, count: int, arrays: dict, what: str = "elements") -> int:
    """Raise ValueError unless `count` elements split into whole 16-byte
    packets of the arrays' dtype and every array is 16-byte aligned; return
    the number of packets (= threads of a one-packet-per-thread kernel)."""
    first = next(iter(arrays.values()))
    size = packet_size(first)
    if count % size != 0:
        raise ValueError(f"{fn}: the 16-byte-load version needs a multiple of {size} {what} "
                         f"({first.dtype}), got {count}")
    for name, a in arrays.items():
        if a is not None and address(a) % 16 != 0:
            raise ValueError(f"{fn}: the 16-byte-load version needs {name} 16-byte aligned, got "
                             f"address {address(a):#x}; pass a fresh array")
    return count // size


def vectorizable(count: int, arrays: dict) -> bool:
    """Whether check_vectorized would accept these: `count` splits into whole packets of
    the arrays' dtype and every array given is 16-byte aligned (version="auto" picks the
    16-byte-load version exactly then)."""
    first = next(iter(arrays.values()))
    return count % packet_size(first) == 0 and all(a is None or address(a) % 16 == 0 for a in arrays.values())
