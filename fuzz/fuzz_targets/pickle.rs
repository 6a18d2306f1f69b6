//! Fuzzes the allow-listed pickle reader of `iapt convert` (`iapt_convert::read_state_dict`).
//!
//! Properties: never panics, never allocates beyond the input's size times a constant; when it
//! accepts a pickle, every tensor has one stride per dimension, at most `MAX_DIMS` dimensions, and
//! keys are unique.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sd) = iapt_convert::read_state_dict(data) {
        let mut keys = HashSet::new();
        for (key, t) in &sd.tensors {
            assert_eq!(t.shape.len(), t.stride.len(), "{key}");
            assert!(t.shape.len() <= iapt_convert::MAX_DIMS, "{key}");
            assert!(keys.insert(key.as_str()), "duplicate key {key}");
        }
    }
});
