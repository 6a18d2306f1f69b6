//! Trained PyTorch checkpoints to IAPT adapters, without ever running a pickle.
//!
//! Inputs: `torch.save` zips (`.bin`, `.pt`, `.pth`), whose `data.pkl` is read by a small
//! allow-listed stack machine ([`read_state_dict`]) that refuses, by name, any global a state_dict
//! does not need; safetensors files; and sharded checkpoints through their `*.index.json`. Names
//! are mapped to spec-v1 tensors by a [`Profile`] (the reference training layout by default),
//! hyperparameters come from a config JSON, the tensor shapes and optionally a base GGUF
//! ([`infer_config`]), and the result is validated with every spec rule before it is written
//! atomically with provenance metadata (source file name and SHA-256, converter version).
//!
//! ```no_run
//! use std::path::Path;
//! use iapt_convert::{convert_to_file, DTypeChoice, Options};
//!
//! let opts = Options {
//!     config: Some("train_config.json".into()),
//!     dtype: DTypeChoice::To(iapt_format::DType::F16),
//!     ..Options::default()
//! };
//! let done = convert_to_file(Path::new("adapter_model.bin"), Path::new("adapter.gguf"), &opts, &mut |_, _| {})?;
//! println!("{} tensors, shared roles: {:?}", done.adapter.tensors().len(), done.shared);
//! # Ok::<(), iapt_convert::ConvertError>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod convert;
mod index;
mod infer;
mod pickle;
mod profile;
mod safetensors_in;
mod torch_zip;

pub use convert::{convert, convert_to_file, Conversion, ConvertError, DTypeChoice, Options, CONVERTER_VERSION};
pub use index::{is_index_path, read_index, Index, IndexError, MAX_INDEX_BYTES};
pub use infer::{infer_config, ActivationSpec, ConfigFile, InferError, MAX_CONFIG_BYTES};
pub use pickle::{
    read_state_dict, PickleError, StateDict, StorageRef, TensorRef, TorchDType, MAX_DEPTH, MAX_DIMS, MAX_ENTRIES, MAX_GLOBAL_NAME,
    MAX_MEMO, MAX_STACK, MAX_WORK,
};
pub use profile::{Mapped, Profile, ProfileError, BUILTIN as BUILTIN_PROFILES, MAX_PROFILE_BYTES};
pub use safetensors_in::{read_header as read_safetensors_header, SafetensorsError, StEntry, MAX_HEADER_BYTES};
pub use torch_zip::{ByteOrder, TorchZip, TorchZipError, MAX_PICKLE_BYTES};
