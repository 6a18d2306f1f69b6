"""Writes the small .npy fixtures read by crates/npy/tests/numpy_fixtures.rs.

Run from this directory: python3 make_fixtures.py (NumPy >= 1.17). The values are exact in every
dtype used, so the Rust test compares them exactly.
"""
import numpy as np

a = (np.arange(6, dtype=np.float64).reshape(2, 3) - 2.5) / 4.0  # exact in f16/f32/f64
np.save("f32_2x3_v1.npy", a.astype(np.float32))
np.save("f16_2x3.npy", a.astype(np.float16))
np.save("f64_2x3.npy", a)
np.save("f32_scalar.npy", np.array(1.5, dtype=np.float32))
np.save("f32_empty_0x4.npy", np.zeros((0, 4), dtype=np.float32))
np.save("f32_fortran.npy", np.asfortranarray(a.astype(np.float32)))
np.save("f32_bigendian.npy", a.astype(">f4"))
np.save("i32_2x3.npy", np.arange(6, dtype=np.int32).reshape(2, 3))
with open("f32_2x3_v2.npy", "wb") as f:
    np.lib.format.write_array(f, a.astype(np.float32), version=(2, 0))
with open("f32_2x3_v3.npy", "wb") as f:
    np.lib.format.write_array(f, a.astype(np.float32), version=(3, 0))
