//! An allow-listed reader for the pickle inside a `torch.save` file: a small stack machine that
//! understands exactly what a state_dict needs and never executes anything.
//!
//! Why hand-written: no maintained Rust crate reads pickles this way. `serde-pickle` (1.2) maps
//! pickles onto serde values, has no persistent-id support (`BINPERSID`, which every torch
//! checkpoint uses for its storages) and resolves only a few builtin globals; `repugnant-pickle`
//! (0.0.1) is an unmaintained scraper with a general object model; candle's reader lives inside
//! `candle-core`, a whole tensor framework. What a converter needs is the opposite of a general
//! object model: a short allow-list, so that a checkpoint that mentions anything else (for example
//! `posix.system` or `builtins.eval`, the usual payloads) is refused before it could do anything.
//!
//! What is understood:
//! - opcodes of protocols 2 to 5 that state_dict pickles use (the binary ones; text-mode protocol 0
//!   opcodes, sets, `NEWOBJ`, `INST`/`OBJ` and extensions are refused);
//! - globals `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//!   `torch._utils._rebuild_parameter`, the `torch.*Storage` classes and the dtypes
//!   `torch.float32`, `torch.float16`, `torch.bfloat16`; any other global is refused by name;
//! - persistent ids `('storage', torch.XStorage, key, location, numel)`, which name the zip entry
//!   `data/{key}` holding the storage's raw bytes.
//!
//! Calling an allowed global builds a description ([`TensorRef`]); nothing is ever looked up or run.
//!
//! Limits: every length read from the input is checked against the bytes left before anything is
//! allocated, containers nest at most [`MAX_DEPTH`] deep, the stack and memo are capped
//! ([`MAX_STACK`], [`MAX_MEMO`]), copy-on-write container copies are charged to a work budget
//! ([`MAX_WORK`]), and flattening the result visits at most [`MAX_ENTRIES`] entries (shared
//! memoized dicts would otherwise fan out exponentially), so that no input makes the reader use
//! more than linear memory and bounded time.

use std::collections::HashMap;
use std::rc::Rc;

/// Largest nesting of tuples, lists and dicts accepted (a state_dict nests 3 or 4 deep).
pub const MAX_DEPTH: usize = 64;
/// Largest number of values on the stack at once.
pub const MAX_STACK: usize = 1 << 20;
/// Largest number of memo entries.
pub const MAX_MEMO: usize = 1 << 20;
/// Work budget: opcodes executed plus container elements copied.
pub const MAX_WORK: u64 = 1 << 24;
/// Entries the flattened state_dict may have (tensors and skipped values, nested dicts counted by
/// their entries): memoized dicts can be shared, so a few kB of pickle can describe 2^40 entries
/// (a dict holding the same dict twice, forty deep); a real state_dict has thousands.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Longest module or attribute name in a `GLOBAL` opcode.
pub const MAX_GLOBAL_NAME: usize = 256;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 16;

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PickleError {
    /// The pickle names a global outside the allow-list; it could run code if loaded by Python.
    #[error(
        "refusing global `{name}` at byte {offset}: a state_dict needs only collections.OrderedDict, \
         torch._utils._rebuild_tensor_v2/_rebuild_parameter, torch.*Storage and torch dtypes; \
         loading this file with torch.load(weights_only=False) could run code; if it is a whole pickled model \
         from a trusted source, re-save it as torch.save(model.state_dict(), path)"
    )]
    ForbiddenGlobal {
        /// `module.name` of the global.
        name: String,
        /// Byte offset of the opcode.
        offset: usize,
    },
    /// An opcode outside the supported subset.
    #[error(
        "opcode {opcode:#04x} at byte {offset} is not used by state_dict pickles and is refused; \
         re-save with torch.save(model.state_dict(), path)"
    )]
    UnsupportedOpcode {
        /// The opcode byte.
        opcode: u8,
        /// Byte offset of the opcode.
        offset: usize,
    },
    /// The pickle ends in the middle of an opcode or before `STOP`.
    #[error("the pickle ends early at byte {offset}; the file is truncated or not a torch checkpoint")]
    Truncated {
        /// Where the input ended.
        offset: usize,
    },
    /// An opcode found the wrong kind of value on the stack.
    #[error("malformed pickle at byte {offset}: {what}; the checkpoint is damaged or not a state_dict")]
    Malformed {
        /// Byte offset of the opcode.
        offset: usize,
        /// What was wrong.
        what: String,
    },
    /// A limit of this reader was exceeded.
    #[error("the pickle exceeds the reader's limit on {what} ({limit}); a state_dict never needs this much")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: u64,
    },
    /// The top-level object is not a dict of tensors.
    #[error("the checkpoint holds a {found}, not a dict of tensors; save model.state_dict() instead")]
    NotAStateDict {
        /// What was found.
        found: &'static str,
    },
    /// Two entries of the (flattened) state_dict have the same name.
    #[error("the state_dict has the key {key:?} twice")]
    DuplicateKey {
        /// The key.
        key: String,
    },
}

/// Element types of torch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDType {
    /// float64 (`DoubleStorage`).
    F64,
    /// float32 (`FloatStorage`).
    F32,
    /// float16 (`HalfStorage`).
    F16,
    /// bfloat16 (`BFloat16Storage`).
    BF16,
    /// int64 (`LongStorage`).
    I64,
    /// int32 (`IntStorage`).
    I32,
    /// int16 (`ShortStorage`).
    I16,
    /// int8 (`CharStorage`).
    I8,
    /// uint8 (`ByteStorage`).
    U8,
    /// bool (`BoolStorage`).
    Bool,
}

impl TorchDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool => 1,
        }
    }

    /// The safetensors spelling (`F32`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TorchDType::F64 => "F64",
            TorchDType::F32 => "F32",
            TorchDType::F16 => "F16",
            TorchDType::BF16 => "BF16",
            TorchDType::I64 => "I64",
            TorchDType::I32 => "I32",
            TorchDType::I16 => "I16",
            TorchDType::I8 => "I8",
            TorchDType::U8 => "U8",
            TorchDType::Bool => "BOOL",
        }
    }

    /// Parses the safetensors spelling.
    pub fn from_name(name: &str) -> Option<TorchDType> {
        [
            TorchDType::F64,
            TorchDType::F32,
            TorchDType::F16,
            TorchDType::BF16,
            TorchDType::I64,
            TorchDType::I32,
            TorchDType::I16,
            TorchDType::I8,
            TorchDType::U8,
            TorchDType::Bool,
        ]
        .into_iter()
        .find(|d| d.name() == name)
    }

    fn from_storage_class(name: &str) -> Option<TorchDType> {
        Some(match name {
            "DoubleStorage" => TorchDType::F64,
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            _ => return None,
        })
    }
}

/// A storage named by a persistent id: the zip entry `data/{key}` with `numel` elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// The storage key (the entry name under `data/`).
    pub key: String,
    /// Element type.
    pub dtype: TorchDType,
    /// Number of elements the storage holds.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage the tensor views.
    pub storage: StorageRef,
    /// Offset of element `[0, 0, ...]` in the storage, in elements.
    pub offset: u64,
    /// Sizes, outermost first.
    pub shape: Vec<u64>,
    /// Strides in elements, one per dimension.
    pub stride: Vec<u64>,
}

/// The tensors of a state_dict pickle, in file order. Nested dicts are flattened with `.`
/// (`{"model": {"w": t}}` gives `model.w`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    /// `(key, tensor)` pairs.
    pub tensors: Vec<(String, TensorRef)>,
    /// Keys whose values are not tensors (numbers, strings, lists), skipped.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    StorageClass(TorchDType),
    DType,
}

#[derive(Debug, Clone)]
struct Seq {
    depth: usize,
    items: Vec<Value>,
}

#[derive(Debug, Clone)]
struct Map {
    depth: usize,
    items: Vec<(Value, Value)>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    /// A bool (only its kind is checked).
    Bool,
    Int(i64),
    /// A float (its value is never needed).
    Float,
    Str(Rc<str>),
    /// Bytes (their value is never needed).
    Bytes,
    Tuple(Rc<Seq>),
    List(Rc<Seq>),
    Dict(Rc<Map>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(m) => m.depth,
            _ => 0,
        }
    }
}

/// Resolves a global against the allow-list.
fn resolve(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", "float32" | "float16" | "bfloat16") => Some(Global::DType),
        ("torch", class) => TorchDType::from_storage_class(class).map(Global::StorageClass),
        _ => None,
    }
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed (for messages).
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    work: u64,
}

impl<'a> Machine<'a> {
    fn malformed<T>(&self, what: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError::Malformed { offset: self.at, what: what.into() })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(PickleError::Truncated { offset: self.data.len() });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length read from the input: checked against the bytes left before anything is allocated.
    fn len(&mut self, n: u64) -> Result<usize, PickleError> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(PickleError::Truncated { offset: self.data.len() });
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_NAME + 1)];
        let Some(end) = window.iter().position(|&b| b == b'\n') else {
            return if rest.len() <= MAX_GLOBAL_NAME {
                Err(PickleError::Truncated { offset: self.data.len() })
            } else {
                Err(PickleError::Limit { what: "global name length", limit: MAX_GLOBAL_NAME as u64 })
            };
        };
        let s = std::str::from_utf8(&rest[..end]).or_else(|_| self.malformed("global name is not UTF-8"))?;
        self.pos += end + 1;
        Ok(s)
    }

    fn charge(&mut self, n: u64) -> Result<(), PickleError> {
        self.work = self.work.saturating_add(n);
        if self.work > MAX_WORK {
            return Err(PickleError::Limit { what: "work (opcodes and copies)", limit: MAX_WORK });
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(PickleError::Limit { what: "stack size", limit: MAX_STACK as u64 });
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.malformed("stack underflow");
        }
        self.stack.pop().map_or_else(|| self.malformed("stack underflow"), Ok)
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.malformed("stack underflow");
        }
        let at = self.at;
        self.stack.last_mut().ok_or(PickleError::Malformed { offset: at, what: "stack underflow".into() })
    }

    /// Pops everything above the last mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(m) = self.marks.pop() else { return self.malformed("no mark on the stack") };
        Ok(self.stack.split_off(m))
    }

    fn seq(&self, items: Vec<Value>) -> Result<Rc<Seq>, PickleError> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(PickleError::Limit { what: "nesting depth", limit: MAX_DEPTH as u64 });
        }
        Ok(Rc::new(Seq { depth, items }))
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err(PickleError::Limit { what: "memo entries", limit: MAX_MEMO as u64 });
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<(), PickleError> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.push(v)
            }
            None => self.malformed(format!("memo entry {idx} is read before it is written")),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        match resolve(module, name) {
            Some(g) => self.push(Value::Global(g)),
            None => Err(PickleError::ForbiddenGlobal { name: format!("{module}.{name}"), offset: self.at }),
        }
    }

    /// Appends items to the list on top of the stack (copy-on-write if the memo shares it).
    fn extend_list(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let add_depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        let n = items.len() as u64;
        let at = self.at;
        let Value::List(list) = self.top()? else {
            return Err(PickleError::Malformed { offset: at, what: "APPEND to something that is not a list".into() });
        };
        let copy = if Rc::strong_count(list) > 1 { list.items.len() as u64 } else { 0 };
        self.charge(copy + n)?;
        let Value::List(list) = self.top()? else { return changed_kind(at) };
        let l = Rc::make_mut(list);
        l.depth = l.depth.max(add_depth);
        if l.depth > MAX_DEPTH {
            return Err(PickleError::Limit { what: "nesting depth", limit: MAX_DEPTH as u64 });
        }
        l.items.extend(items);
        Ok(())
    }

    /// Adds key/value pairs to the dict on top of the stack (copy-on-write if the memo shares it).
    fn extend_dict(&mut self, flat: Vec<Value>) -> Result<(), PickleError> {
        if flat.len() % 2 != 0 {
            return self.malformed("SETITEMS with an odd number of values");
        }
        let add_depth = flat.iter().map(Value::depth).max().unwrap_or(0) + 1;
        let n = flat.len() as u64;
        let at = self.at;
        let Value::Dict(map) = self.top()? else {
            return Err(PickleError::Malformed { offset: at, what: "SETITEM on something that is not a dict".into() });
        };
        let copy = if Rc::strong_count(map) > 1 { map.items.len() as u64 } else { 0 };
        self.charge(copy + n)?;
        let Value::Dict(map) = self.top()? else { return changed_kind(at) };
        let m = Rc::make_mut(map);
        m.depth = m.depth.max(add_depth);
        if m.depth > MAX_DEPTH {
            return Err(PickleError::Limit { what: "nesting depth", limit: MAX_DEPTH as u64 });
        }
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            m.items.push((k, v));
        }
        Ok(())
    }

    fn reduce(&mut self) -> Result<(), PickleError> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Value::Tuple(args) = args else { return self.malformed(format!("REDUCE arguments are a {}, not a tuple", args.kind())) };
        let Value::Global(g) = callable else { return self.malformed(format!("REDUCE on a {}, not a global", callable.kind())) };
        let a = &args.items;
        let v = match g {
            Global::OrderedDict if a.is_empty() => Value::Dict(Rc::new(Map { depth: 1, items: Vec::new() })),
            Global::OrderedDict => return self.malformed("OrderedDict called with arguments"),
            Global::RebuildTensorV2 => {
                if !(6..=7).contains(&a.len()) {
                    return self.malformed(format!("_rebuild_tensor_v2 takes 6 or 7 arguments, got {}", a.len()));
                }
                let Value::Storage(storage) = &a[0] else { return self.malformed("_rebuild_tensor_v2: first argument is not a storage") };
                let offset = self.uint(&a[1], "storage offset")?;
                let shape = self.dims(&a[2], "size")?;
                let stride = self.dims(&a[3], "stride")?;
                if !matches!(a[4], Value::Bool) {
                    return self.malformed("_rebuild_tensor_v2: requires_grad is not a bool");
                }
                if shape.len() != stride.len() {
                    return self.malformed(format!("size has {} dimensions but stride has {}", shape.len(), stride.len()));
                }
                Value::Tensor(Rc::new(TensorRef { storage: (**storage).clone(), offset, shape, stride }))
            }
            Global::RebuildParameter => match a.first() {
                Some(Value::Tensor(t)) if a.len() == 3 => Value::Tensor(t.clone()),
                _ => return self.malformed("_rebuild_parameter takes (tensor, requires_grad, hooks)"),
            },
            Global::StorageClass(_) | Global::DType => return self.malformed("a storage class or dtype is called"),
        };
        self.push(v)
    }

    fn uint(&self, v: &Value, what: &str) -> Result<u64, PickleError> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            _ => self.malformed(format!("{what} is a {}, not a non-negative int", v.kind())),
        }
    }

    fn dims(&self, v: &Value, what: &str) -> Result<Vec<u64>, PickleError> {
        let Value::Tuple(t) = v else { return self.malformed(format!("{what} is a {}, not a tuple", v.kind())) };
        if t.items.len() > MAX_DIMS {
            return Err(PickleError::Limit { what: "tensor dimensions", limit: MAX_DIMS as u64 });
        }
        t.items.iter().map(|d| self.uint(d, what)).collect()
    }

    fn persistent(&mut self) -> Result<(), PickleError> {
        let pid = self.pop()?;
        let Value::Tuple(t) = &pid else { return self.malformed(format!("persistent id is a {}, not a tuple", pid.kind())) };
        let v = match t.items.as_slice() {
            [Value::Str(tag), Value::Global(Global::StorageClass(dtype)), Value::Str(key), Value::Str(_location), numel]
                if &**tag == "storage" =>
            {
                let numel = self.uint(numel, "storage size")?;
                Value::Storage(Rc::new(StorageRef { key: key.to_string(), dtype: *dtype, numel }))
            }
            _ => return self.malformed("persistent id is not ('storage', torch.XStorage, key, location, numel)"),
        };
        self.push(v)
    }

    fn string(&mut self, n: u64) -> Result<(), PickleError> {
        let n = self.len(n)?;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).or_else(|_| self.malformed("string is not UTF-8"))?;
        self.push(Value::Str(Rc::from(s)))
    }

    fn bytes(&mut self, n: u64) -> Result<(), PickleError> {
        let n = self.len(n)?;
        self.take(n)?;
        self.push(Value::Bytes)
    }

    fn long(&mut self, n: u64) -> Result<(), PickleError> {
        let n = self.len(n)?;
        if n > 8 {
            return self.malformed(format!("integer of {n} bytes does not fit in 64 bits"));
        }
        let b = self.take(n)?;
        let mut v: i64 = 0;
        for (i, &byte) in b.iter().enumerate() {
            v |= i64::from(byte) << (8 * i);
        }
        if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
            v -= 1i64 << (8 * n); // two's complement sign extension
        }
        self.push(Value::Int(v))
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            self.at = self.pos;
            self.charge(1)?;
            let opcode = self.byte()?;
            match opcode {
                op::PROTO => {
                    let v = self.byte()?;
                    if !(2..=5).contains(&v) {
                        return self.malformed(format!("pickle protocol {v} (this reader supports 2 to 5)"));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => {
                    if !self.marks.is_empty() {
                        return self.malformed("STOP with an open mark");
                    }
                    return match (self.stack.pop(), self.stack.is_empty()) {
                        (Some(v), true) => Ok(v),
                        _ => self.malformed("STOP with a stack that does not hold exactly one value"),
                    };
                }
                op::MARK => {
                    if self.marks.len() >= MAX_STACK {
                        return Err(PickleError::Limit { what: "stack size", limit: MAX_STACK as u64 });
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    self.pop()?;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                op::NONE => self.push(Value::None)?,
                op::NEWTRUE | op::NEWFALSE => self.push(Value::Bool)?,
                op::BININT => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::BININT1 => {
                    let v = self.byte()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::BININT2 => {
                    let v = self.u16()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::LONG1 => {
                    let n = self.byte()?;
                    self.long(u64::from(n))?;
                }
                op::LONG4 => {
                    let n = self.u32()?;
                    self.long(u64::from(n))?;
                }
                op::BINFLOAT => {
                    self.take(8)?;
                    self.push(Value::Float)?;
                }
                op::SHORT_BINUNICODE | op::SHORT_BINSTRING => {
                    let n = self.byte()?;
                    self.string(u64::from(n))?;
                }
                op::BINUNICODE | op::BINSTRING => {
                    let n = self.u32()?;
                    self.string(u64::from(n))?;
                }
                op::BINUNICODE8 => {
                    let n = self.u64()?;
                    self.string(n)?;
                }
                op::SHORT_BINBYTES => {
                    let n = self.byte()?;
                    self.bytes(u64::from(n))?;
                }
                op::BINBYTES => {
                    let n = self.u32()?;
                    self.bytes(u64::from(n))?;
                }
                op::BINBYTES8 => {
                    let n = self.u64()?;
                    self.bytes(n)?;
                }
                op::EMPTY_TUPLE => {
                    let t = self.seq(Vec::new())?;
                    self.push(Value::Tuple(t))?;
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(opcode - op::TUPLE1 + 1);
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return self.malformed("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let t = self.seq(items)?;
                    self.push(Value::Tuple(t))?;
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    let t = self.seq(items)?;
                    self.push(Value::Tuple(t))?;
                }
                op::EMPTY_LIST => {
                    let l = self.seq(Vec::new())?;
                    self.push(Value::List(l))?;
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    let l = self.seq(items)?;
                    self.push(Value::List(l))?;
                }
                op::APPEND => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                op::EMPTY_DICT => self.push(Value::Dict(Rc::new(Map { depth: 1, items: Vec::new() })))?,
                op::DICT => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Rc::new(Map { depth: 1, items: Vec::new() })))?;
                    self.extend_dict(items)?;
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![k, v])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.extend_dict(items)?;
                }
                op::BINPUT => {
                    let i = self.byte()?;
                    self.memo_put(u32::from(i))?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                op::MEMOIZE => {
                    let i = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.byte()?;
                    self.memo_get(u32::from(i))?;
                }
                op::LONG_BINGET => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?;
                        }
                        _ => return self.malformed("STACK_GLOBAL needs two strings"),
                    }
                }
                op::REDUCE => self.reduce()?,
                op::BUILD => {
                    // The state of an OrderedDict (its `_metadata`) or a tensor is not needed.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            let kind = other.kind();
                            return self.malformed(format!("BUILD on a {kind}"));
                        }
                    }
                }
                op::BINPERSID => self.persistent()?,
                other => return Err(PickleError::UnsupportedOpcode { opcode: other, offset: self.at }),
            }
        }
    }
}

fn changed_kind<T>(at: usize) -> Result<T, PickleError> {
    Err(PickleError::Malformed { offset: at, what: "container changed kind".into() })
}

/// Reads a state_dict pickle (`data.pkl` of a `torch.save` zip). Never runs anything: a global
/// outside the allow-list is refused with [`PickleError::ForbiddenGlobal`], naming it.
pub fn read_state_dict(pickle: &[u8]) -> Result<StateDict, PickleError> {
    let machine = Machine { data: pickle, pos: 0, at: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), work: 0 };
    let top = machine.run()?;
    let Value::Dict(map) = top else { return Err(PickleError::NotAStateDict { found: top.kind() }) };
    let mut out = StateDict::default();
    let mut seen = std::collections::HashSet::new();
    let mut visited = 0;
    flatten(&map, "", &mut out, &mut seen, &mut visited)?;
    Ok(out)
}

/// Adds the entries of `map` (keys prefixed) to `out`; every entry visited counts against
/// [`MAX_ENTRIES`], so shared dicts cannot make the walk exponential.
fn flatten(
    map: &Map,
    prefix: &str,
    out: &mut StateDict,
    seen: &mut std::collections::HashSet<String>,
    visited: &mut u64,
) -> Result<(), PickleError> {
    for (k, v) in &map.items {
        *visited += 1;
        if *visited > MAX_ENTRIES {
            return Err(PickleError::Limit { what: "entries of the flattened state_dict", limit: MAX_ENTRIES });
        }
        let key = match k {
            Value::Str(s) => format!("{prefix}{s}"),
            Value::Int(i) => format!("{prefix}{i}"),
            _ => continue,
        };
        match v {
            Value::Tensor(t) => {
                if !seen.insert(key.clone()) {
                    return Err(PickleError::DuplicateKey { key });
                }
                out.tensors.push((key, (**t).clone()));
            }
            Value::Dict(inner) => flatten(inner, &format!("{key}."), out, seen, visited)?,
            _ => out.skipped.push(key),
        }
    }
    Ok(())
}
