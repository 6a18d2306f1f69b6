//! Per-sequence KV-cache control of a [`Context`]: free a sequence's cells at once so that its
//! slot can be reused, and ask where a sequence ends (`llama_memory_seq_*`).

use llama_cpp_sys_2 as sys;

use super::Context;

impl Context<'_> {
    /// Removes every KV cell of sequence `seq` (`llama_memory_seq_rm` over all positions): the
    /// cells are free for any sequence at once. Removing a whole sequence never fails in
    /// llama.cpp; `false` only when `seq` is negative, the context has no memory, or llama.cpp
    /// threw (an allocation failure, caught by the shim).
    pub fn seq_rm(&mut self, seq: i32) -> bool {
        if seq < 0 {
            return false;
        }
        // SAFETY: the context is valid and used by one thread (`&mut self`); the memory handle
        // lives as long as the context; p0 = p1 = -1 is "every position", which never fails.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            !mem.is_null() && super::shim::memory_seq_rm(mem, seq, -1, -1).unwrap_or(false)
        }
    }

    /// Removes the KV cells of sequence `seq` at positions `p0` and after (what a failed decode may
    /// have written there), keeping the ones before. `false` when `seq` or `p0` is negative, the
    /// context has no memory, or llama.cpp refused (a memory that cannot remove a partial range).
    pub fn seq_rm_from(&mut self, seq: i32, p0: i32) -> bool {
        if seq < 0 || p0 < 0 {
            return false;
        }
        // SAFETY: as in `seq_rm`; p1 = -1 is "to the end".
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            !mem.is_null() && super::shim::memory_seq_rm(mem, seq, p0, -1).unwrap_or(false)
        }
    }

    /// Makes sequence `dst` a copy of sequence `src` (every position; `llama_memory_seq_cp`), for a
    /// fork after a shared prefill. With one KV stream per sequence llama.cpp copies `src`'s stream
    /// into `dst`'s at the next decode, replacing whatever `dst` held; in a unified cache the cells
    /// are shared. `false` when either id is outside `0..n_seq_max`, they are equal, the context
    /// has no memory, or llama.cpp threw.
    pub fn seq_cp(&mut self, src: i32, dst: i32) -> bool {
        if src == dst || !self.seq_in_range(src) || !self.seq_in_range(dst) {
            return false;
        }
        // SAFETY: the context is valid and used by one thread (`&mut self`); the memory handle lives
        // as long as the context; both ids were checked to be in 0..n_seq_max just above, which is
        // what llama.cpp asserts.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            !mem.is_null() && super::shim::memory_seq_cp(mem, src, dst).is_ok()
        }
    }

    /// A copy of sequence `seq`'s KV cells (positions and K/V data; `llama_state_seq_get_data`), to be
    /// loaded into any sequence of this context later ([`Context::set_seq_state`]). `None` when
    /// `seq` is out of range or llama.cpp could not write it.
    pub fn seq_state(&mut self, seq: i32) -> Option<Vec<u8>> {
        if !self.seq_in_range(seq) {
            return None;
        }
        // SAFETY: the context is valid and used by one thread (`&mut self`); `seq` was checked to be
        // in 0..n_seq_max just above; an empty buffer asks for the size only.
        let size = unsafe { super::shim::state_seq_get(self.ptr.as_ptr(), seq, &mut []) }.ok()?;
        let mut buf = vec![0u8; size];
        // SAFETY: as above; `buf` is writable for `size` bytes, the size llama.cpp asked for.
        let written = unsafe { super::shim::state_seq_get(self.ptr.as_ptr(), seq, &mut buf) }.ok()?;
        (written == size && size > 0).then_some(buf)
    }

    /// Loads a copy made by [`Context::seq_state`] into sequence `seq` (its cells and positions as
    /// they were; `llama_state_seq_set_data`). `seq` should hold no cells. `false` when `seq` is out
    /// of range, the copy does not fit (llama.cpp found no room) or does not parse.
    pub fn set_seq_state(&mut self, seq: i32, state: &[u8]) -> bool {
        if !self.seq_in_range(seq) || state.is_empty() {
            return false;
        }
        // SAFETY: the context is valid and used by one thread (`&mut self`); `seq` was checked to be
        // in 0..n_seq_max; `state` is readable for its length. llama.cpp reads the copy through a
        // bounds-checked reader and returns 0 (or throws, caught by the shim) on a bad one.
        unsafe { super::shim::state_seq_set(self.ptr.as_ptr(), state, seq) }.is_ok_and(|n| n > 0)
    }

    fn seq_in_range(&self, seq: i32) -> bool {
        // SAFETY: the context is valid.
        let n_seq = unsafe { sys::llama_n_seq_max(self.ptr.as_ptr()) } as i64;
        (0..n_seq).contains(&i64::from(seq))
    }

    /// The largest position sequence `seq` holds in the KV cache, or `None` when it holds none.
    pub fn seq_pos_max(&self, seq: i32) -> Option<i32> {
        if seq < 0 {
            return None;
        }
        // SAFETY: the context is valid; the memory handle lives as long as the context; the
        // call only reads the cache's metadata.
        let p = unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            if mem.is_null() {
                return None;
            }
            sys::llama_memory_seq_pos_max(mem, seq)
        };
        (p >= 0).then_some(p)
    }
}
