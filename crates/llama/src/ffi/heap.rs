//! Giving freed heap memory back to the operating system (glibc's `malloc_trim`), for a process
//! that makes and drops large allocations at run time: a server whose adapters come and go
//! (issue 29). glibc keeps a freed chunk inside its arena, and with one arena per thread that
//! allocated (the threads that build adapters' generators) the freed weights of evicted adapters
//! stay resident; measured in `bench/tenants` (1000 adapters, a cap of 32), the server's peak RSS
//! exceeded the cap's weights by ~30% without it. `malloc_trim` walks every arena and returns the
//! whole free pages inside them (`MADV_DONTNEED`). It lives here, beside the llama.cpp FFI, because
//! this is the crate that declares foreign functions for the runtime; elsewhere (another libc) it
//! does nothing.

/// Returns the free pages of every heap arena to the operating system. Cheap enough to call after
/// dropping megabytes (it walks the free lists); a no-op outside glibc.
pub fn release_freed_heap_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            /// glibc (`malloc.h`): `int malloc_trim(size_t pad)`.
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: `malloc_trim` takes no pointer and only walks glibc's own arenas under their
        // locks, so it is sound from any thread at any time; its result (whether memory was
        // released) is not needed.
        unsafe {
            malloc_trim(0);
        }
    }
}
