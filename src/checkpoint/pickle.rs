//! A restricted reader for PyTorch zip checkpoints (`.ckpt`, `.pt`, `.pth`).
//!
//! Nothing in the pickle is executed. The opcodes are interpreted into an inert object
//! tree (calls and globals stay symbolic), then only one shape is accepted: a dict of
//! name -> `torch._utils._rebuild_tensor_v2(...)` (optionally under a `state_dict` key,
//! optionally wrapped in `_rebuild_parameter`). Tensor bytes are located inside the
//! uncompressed zip entries, so tensors are read straight from the memory map.
//!
//! Every length is checked against the remaining input before anything is allocated,
//! and memoized objects are shared (`Rc`), so a hostile pickle cannot blow up memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Cursor;
use std::rc::Rc;

use crate::dtype::DType;

/// Upper bound on the size of the pickle stream itself (not the tensor data).
const MAX_PICKLE_LEN: usize = 512 * 1024 * 1024;

/// Where a tensor's elements live inside the mapped file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickledTensor {
    /// State-dict key.
    pub name: String,
    /// Element type (from the storage class).
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of element 0 in the file.
    pub start: usize,
    /// Strides in elements.
    pub strides: Vec<usize>,
}

/// A shared, mutable dict (pickle memo entries alias the same object).
type DictRef = Rc<RefCell<Vec<(Obj, Obj)>>>;

#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<Vec<Obj>>),
    List(Rc<RefCell<Vec<Obj>>>),
    Dict(DictRef),
    Global(Rc<(String, String)>),
    Call(Rc<(Obj, Obj)>),
    Persistent(Rc<Obj>),
}

impl Obj {
    fn describe(&self) -> String {
        match self {
            Obj::None => "None".into(),
            Obj::Bool => "a bool".into(),
            Obj::Int(_) => "an int".into(),
            Obj::Float => "a float".into(),
            Obj::Str(_) => "a string".into(),
            Obj::Bytes => "bytes".into(),
            Obj::Tuple(_) => "a tuple".into(),
            Obj::List(_) => "a list".into(),
            Obj::Dict(_) => "a dict".into(),
            Obj::Global(g) => format!("the global {}.{}", g.0, g.1),
            Obj::Call(c) => match &c.0 {
                Obj::Global(g) => format!("an object built by {}.{}", g.0, g.1),
                _ => "an object".into(),
            },
            Obj::Persistent(_) => "a persistent reference".into(),
        }
    }

    fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Obj::Global(g) if g.0 == module && g.1 == name)
    }
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    marks: Vec<usize>,
    memo: HashMap<u32, Obj>,
}

type PResult<T> = Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if n > self.input.len() - self.pos {
            return Err(format!(
                "pickle ends early at byte {} (needed {n} more bytes)",
                self.pos
            ));
        }
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("unterminated GLOBAL name")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> PResult<Obj> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| format!("invalid UTF-8 string at byte {}", self.pos))?;
        Ok(Obj::Str(Rc::from(s)))
    }

    fn pop(&mut self) -> PResult<Obj> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (popped past a mark)".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&mut self) -> PResult<&mut Obj> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Obj>> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("corrupt MARK".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, id: u32) -> PResult<()> {
        let v = self.stack.last().ok_or("MEMO on an empty stack")?.clone();
        self.memo.insert(id, v);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> PResult<()> {
        let v = self
            .memo
            .get(&id)
            .ok_or_else(|| format!("memo entry {id} missing"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    fn set_items(target: &Obj, items: Vec<Obj>) -> PResult<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        if let Obj::Dict(d) = target {
            let mut d = d.borrow_mut();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                d.push((k, v));
            }
        }
        // Items set on opaque objects are ignored: nothing is executed.
        Ok(())
    }

    fn append(target: &Obj, items: Vec<Obj>) {
        if let Obj::List(l) = target {
            l.borrow_mut().extend(items);
        }
    }

    fn reduce(func: Obj, args: Obj) -> Obj {
        // An empty OrderedDict is the container torch uses for state dicts.
        if func.is_global("collections", "OrderedDict") {
            if let Obj::Tuple(t) = &args {
                if t.is_empty() {
                    return Obj::Dict(Rc::new(RefCell::new(Vec::new())));
                }
            }
        }
        Obj::Call(Rc::new((func, args)))
    }

    fn run(mut self) -> PResult<Obj> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self
                    .stack
                    .push(Obj::Dict(Rc::new(RefCell::new(Vec::new())))),
                b']' => self
                    .stack
                    .push(Obj::List(Rc::new(RefCell::new(Vec::new())))),
                b')' => self.stack.push(Obj::Tuple(Rc::new(Vec::new()))),
                b'N' => self.stack.push(Obj::None),
                0x88 => self.stack.push(Obj::Bool),
                0x89 => self.stack.push(Obj::Bool),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Obj::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Obj::Int(v as i64))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Obj::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("LONG1 of {n} bytes is too large"));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Obj::Int(v))
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Obj::Float)
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s)
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
                    let s = self.string(n)?;
                    self.stack.push(s)
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.stack.push(Obj::Bytes)
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.stack.push(Obj::Bytes)
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.stack.push(Obj::Global(Rc::new((module, name))))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Obj::Str(m), Obj::Str(n)) => self
                            .stack
                            .push(Obj::Global(Rc::new((m.to_string(), n.to_string())))),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'q' => {
                    let id = self.u8()? as u32;
                    self.memo_put(id)?
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memo_put(id)?
                }
                0x94 => {
                    let id = self.memo.len() as u32;
                    self.memo_put(id)?
                }
                b'h' => {
                    let id = self.u8()? as u32;
                    self.memo_get(id)?
                }
                b'j' => {
                    let id = self.u32()?;
                    self.memo_get(id)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(Rc::new(items)))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Obj::Tuple(Rc::new(items)))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::List(Rc::new(RefCell::new(items))))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Obj::Dict(Rc::new(RefCell::new(Vec::new())));
                    Self::set_items(&d, items)?;
                    self.stack.push(d)
                }
                b'a' => {
                    let v = self.pop()?;
                    let t = self.top()?.clone();
                    Self::append(&t, vec![v])
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    Self::append(&t, items)
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let t = self.top()?.clone();
                    Self::set_items(&t, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    Self::set_items(&t, items)?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.stack.push(Self::reduce(func, args))
                }
                b'b' => {
                    // BUILD sets state on an object; the state is not needed and nothing runs.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Obj::Persistent(Rc::new(pid)))
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?.clone();
                    self.stack.push(t)
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}

/// Interprets a pickle stream into an inert object tree.
fn unpickle(input: &[u8]) -> PResult<Obj> {
    if input.len() > MAX_PICKLE_LEN {
        return Err(format!(
            "pickle stream of {} bytes is too large",
            input.len()
        ));
    }
    Machine {
        input,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// A stored zip entry: absolute data offset and length.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: usize,
    len: usize,
}

struct TensorRef {
    dtype: DType,
    storage_key: String,
    storage_numel: usize,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

fn usize_of(o: &Obj, what: &str) -> PResult<usize> {
    match o {
        Obj::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| format!("{what} too large")),
        other => Err(format!(
            "{what} must be a non-negative int, found {}",
            other.describe()
        )),
    }
}

fn usize_tuple(o: &Obj, what: &str) -> PResult<Vec<usize>> {
    match o {
        Obj::Tuple(t) => t.iter().map(|v| usize_of(v, what)).collect(),
        other => Err(format!(
            "{what} must be a tuple, found {}",
            other.describe()
        )),
    }
}

/// Recognizes `_rebuild_tensor_v2(storage, offset, size, stride, ...)` and its wrappers.
fn tensor_ref(value: &Obj) -> PResult<TensorRef> {
    let Obj::Call(call) = value else {
        return Err(format!("value is {}, not a tensor", value.describe()));
    };
    let (func, args) = (&call.0, &call.1);
    let Obj::Tuple(args) = args else {
        return Err("tensor arguments are not a tuple".into());
    };
    if func.is_global("torch._utils", "_rebuild_parameter") {
        let inner = args.first().ok_or("_rebuild_parameter without arguments")?;
        return tensor_ref(inner);
    }
    if func.is_global("torch._tensor", "_rebuild_from_type_v2") {
        // (func, type, args, state): rebuild the plain tensor from func(*args).
        let (Some(f), Some(a)) = (args.first(), args.get(2)) else {
            return Err("malformed _rebuild_from_type_v2".into());
        };
        return tensor_ref(&Obj::Call(Rc::new((f.clone(), a.clone()))));
    }
    if !func.is_global("torch._utils", "_rebuild_tensor_v2") {
        return Err(format!("value is {}, not a tensor", value.describe()));
    }
    if args.len() < 4 {
        return Err("_rebuild_tensor_v2 needs at least 4 arguments".into());
    }
    let Obj::Persistent(pid) = &args[0] else {
        return Err("tensor storage is not a persistent reference".into());
    };
    let Obj::Tuple(pid) = &**pid else {
        return Err("storage reference is not a tuple".into());
    };
    let (Some(Obj::Str(tag)), Some(Obj::Global(class)), Some(Obj::Str(key)), Some(numel)) =
        (pid.first(), pid.get(1), pid.get(2), pid.get(4))
    else {
        return Err("malformed storage reference".into());
    };
    if &**tag != "storage" {
        return Err(format!("unknown persistent reference `{tag}`"));
    }
    let dtype = storage_dtype(&class.1)
        .ok_or_else(|| format!("unsupported storage type {}.{}", class.0, class.1))?;
    let shape = usize_tuple(&args[2], "tensor size")?;
    let strides = usize_tuple(&args[3], "tensor stride")?;
    if shape.len() != strides.len() {
        return Err("size and stride have different lengths".into());
    }
    Ok(TensorRef {
        dtype,
        storage_key: key.to_string(),
        storage_numel: usize_of(numel, "storage size")?,
        offset: usize_of(&args[1], "storage offset")?,
        shape,
        strides,
    })
}

/// Locates every tensor of a torch zip checkpoint mapped in `bytes`.
pub fn read_tensors(bytes: &[u8]) -> PResult<Vec<PickledTensor>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a valid zip archive: {e}"))?;
    let mut entries: HashMap<String, Entry> = HashMap::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = f
            .name()
            .map_err(|e| format!("zip entry {i}: {e}"))?
            .to_string();
        if f.is_dir() {
            continue;
        }
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "zip entry `{name}` is compressed; torch checkpoints store entries uncompressed"
            ));
        }
        let start = f
            .data_start()
            .ok_or_else(|| format!("zip entry `{name}`: unknown data offset"))?;
        let (start, len) = (start as usize, f.size() as usize);
        if start.checked_add(len).is_none_or(|end| end > bytes.len()) {
            return Err(format!(
                "zip entry `{name}` extends past the end of the file"
            ));
        }
        entries.insert(name, Entry { start, len });
    }
    let pkl_names: Vec<&String> = entries.keys().filter(|n| n.ends_with("data.pkl")).collect();
    let [pkl_name] = pkl_names[..] else {
        return Err(format!(
            "expected exactly one data.pkl in the archive, found {}",
            pkl_names.len()
        ));
    };
    let dir = pkl_name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_string();
    let pkl = entries[pkl_name];
    let root = unpickle(&bytes[pkl.start..pkl.start + pkl.len])?;

    let state = state_dict(&root)?;
    let items = state.borrow();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items.iter() {
        let Obj::Str(name) = k else {
            return Err(format!(
                "state dict key is {}, expected a string",
                k.describe()
            ));
        };
        let t = tensor_ref(v).map_err(|e| {
            format!("`{name}`: {e}; only plain tensors are read (re-save the file with safetensors if it holds other objects)")
        })?;
        let entry_name = format!("{dir}data/{}", t.storage_key);
        let entry = entries.get(&entry_name).ok_or_else(|| {
            format!("`{name}`: storage `{entry_name}` is missing from the archive")
        })?;
        let es = t.dtype.bits() / 8;
        let storage_bytes = t
            .storage_numel
            .checked_mul(es)
            .ok_or_else(|| format!("`{name}`: storage size overflows"))?;
        if storage_bytes > entry.len {
            return Err(format!(
                "`{name}`: storage needs {storage_bytes} bytes but `{entry_name}` holds {}",
                entry.len
            ));
        }
        // Highest element index reachable through the view must lie inside the storage.
        let mut last = t.offset;
        if t.shape.iter().all(|&d| d > 0) {
            for (&d, &s) in t.shape.iter().zip(&t.strides) {
                last = (d - 1)
                    .checked_mul(s)
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(|| format!("`{name}`: strides overflow"))?;
            }
            if last >= t.storage_numel {
                return Err(format!(
                    "`{name}`: tensor view reaches past the end of its storage"
                ));
            }
        }
        out.push(PickledTensor {
            name: name.to_string(),
            dtype: t.dtype,
            shape: t.shape,
            start: entry.start + t.offset * es,
            strides: t.strides,
        });
    }
    Ok(out)
}

/// The tensor dict: the root itself, or the value under `state_dict`.
fn state_dict(root: &Obj) -> PResult<DictRef> {
    let Obj::Dict(d) = root else {
        return Err(format!(
            "top-level object is {}, expected a dict of tensors",
            root.describe()
        ));
    };
    let nested = d
        .borrow()
        .iter()
        .find(|(k, _)| matches!(k, Obj::Str(s) if &**s == "state_dict"))
        .map(|(_, v)| v.clone());
    match nested {
        Some(Obj::Dict(inner)) => Ok(inner),
        Some(other) => Err(format!(
            "`state_dict` is {}, expected a dict",
            other.describe()
        )),
        None => Ok(d.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_opcode_and_truncation() {
        assert!(unpickle(b"\x80\x02Z")
            .unwrap_err()
            .contains("unsupported pickle opcode"));
        assert!(unpickle(b"\x80\x02X\xff\xff\xff\xff")
            .unwrap_err()
            .contains("ends early"));
        assert!(unpickle(b"\x80\x02.").unwrap_err().contains("underflow"));
    }

    #[test]
    fn never_executes_reduce() {
        // os.system("x") as a pickle: GLOBAL, args, REDUCE. It must stay an inert Call.
        let p = b"\x80\x02cos\nsystem\nq\x00X\x01\x00\x00\x00x\x85R.";
        let o = unpickle(p).unwrap();
        assert!(matches!(o, Obj::Call(_)));
        assert!(state_dict(&o).unwrap_err().contains("os.system"));
    }

    #[test]
    fn long1_sign() {
        let o = unpickle(b"\x8a\x01\xff.").unwrap();
        assert!(matches!(o, Obj::Int(-1)));
        let o = unpickle(b"\x8a\x02\xff\x00.").unwrap();
        assert!(matches!(o, Obj::Int(255)));
    }
}
