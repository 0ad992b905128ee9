//! Reads `pytorch_model.bin` (a state dict written by `torch.save`) without running
//! any pickled code.
//!
//! tch cannot do this: its `Tensor::loadz_multi` calls `torch::jit::_load_parameters`,
//! which reads TorchScript/mobile archives, not `torch.save` zip files. The format
//! is a zip archive (entries stored uncompressed) holding `<name>/data.pkl`, a
//! pickle of the `OrderedDict`, and `<name>/data/<key>`, the raw bytes of each
//! storage. We interpret the pickle with a small stack machine that knows only the
//! opcodes and the globals a state dict uses (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch.*Storage`); anything else is an error
//! naming it, never a call.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Kind, Tensor};

/// The tensors of the state dict in `path`, on the CPU, in file order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{}: not a readable torch.save state dict", path.display()))
}

fn parse(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let entries = zip_entries(bytes)?;
    let pkl_name = entries
        .keys()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| anyhow!("no data.pkl in the zip archive (a legacy, pre-1.6 torch.save file?)"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let value = Unpickler::default().run(entries[pkl_name])?;
    let V::Dict(items) = value else { bail!("the pickle is not a dict") };
    let mut out = Vec::new();
    for (k, v) in items {
        let (V::Str(name), V::Tensor(t)) = (k, v) else {
            continue;
        };
        let data = entries
            .get(format!("{prefix}data/{}", t.key).as_str())
            .ok_or_else(|| anyhow!("storage {} of {name} is missing from the archive", t.key))?;
        let elt = t.kind.elt_size_in_bytes();
        let storage = Tensor::f_from_data_size(data, &[(data.len() / elt) as i64], t.kind)?;
        let tensor = storage.f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?.contiguous();
        out.push((name, tensor));
    }
    Ok(out)
}

// ---- zip: just enough to find stored (uncompressed) entries -------------------

fn u16_at(b: &[u8], i: usize) -> Result<u64> {
    b.get(i..i + 2).map(|s| u16::from_le_bytes([s[0], s[1]]) as u64).ok_or_else(|| anyhow!("truncated zip"))
}
fn u32_at(b: &[u8], i: usize) -> Result<u64> {
    b.get(i..i + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()) as u64).ok_or_else(|| anyhow!("truncated zip"))
}
fn u64_at(b: &[u8], i: usize) -> Result<u64> {
    b.get(i..i + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap())).ok_or_else(|| anyhow!("truncated zip"))
}

/// Entry name -> contents, from the central directory (zip64 included).
fn zip_entries(b: &[u8]) -> Result<HashMap<String, &[u8]>> {
    let search_from = b.len().saturating_sub(22 + 65535);
    let eocd = (search_from..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| anyhow!("not a zip archive"))?;
    let (mut count, mut cd) = (u16_at(b, eocd + 10)?, u32_at(b, eocd + 16)?);
    if cd == 0xffff_ffff || count == 0xffff {
        let locator = eocd.checked_sub(20).ok_or_else(|| anyhow!("bad zip64 locator"))?;
        let rec = u64_at(b, locator + 8)? as usize;
        count = u64_at(b, rec + 32)?;
        cd = u64_at(b, rec + 48)?;
    }
    let mut entries = HashMap::new();
    let mut p = cd as usize;
    for _ in 0..count {
        if u32_at(b, p)? != 0x0201_4b50 {
            bail!("corrupt zip central directory");
        }
        let method = u16_at(b, p + 10)?;
        let (mut size, mut local) = (u32_at(b, p + 24)?, u32_at(b, p + 42)?);
        let (name_len, extra_len, comment_len) =
            (u16_at(b, p + 28)? as usize, u16_at(b, p + 30)? as usize, u16_at(b, p + 32)? as usize);
        let name = String::from_utf8_lossy(b.get(p + 46..p + 46 + name_len).ok_or_else(|| anyhow!("truncated zip"))?)
            .into_owned();
        // zip64 extra field: the 64-bit values of the fields set to 0xffffffff, in order.
        let mut e = p + 46 + name_len;
        let extra_end = e + extra_len;
        while e + 4 <= extra_end {
            let (id, len) = (u16_at(b, e)?, u16_at(b, e + 2)? as usize);
            if id == 1 {
                let mut q = e + 4;
                if size == 0xffff_ffff {
                    size = u64_at(b, q)?;
                    q += 8;
                }
                if u32_at(b, p + 20)? == 0xffff_ffff {
                    q += 8;
                }
                if local == 0xffff_ffff {
                    local = u64_at(b, q)?;
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            bail!("zip entry {name} is compressed (method {method}); torch.save stores entries uncompressed");
        }
        let l = local as usize;
        let start = l + 30 + u16_at(b, l + 26)? as usize + u16_at(b, l + 28)? as usize;
        let data = b.get(start..start + size as usize).ok_or_else(|| anyhow!("truncated zip entry {name}"))?;
        entries.insert(name, data);
        p = extra_end + comment_len;
    }
    Ok(entries)
}

// ---- pickle: a restricted interpreter ------------------------------------------

#[derive(Debug, Clone)]
struct TensorRef {
    key: String,
    kind: Kind,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone)]
enum V {
    Mark,
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(String),
    /// A persistent id `('storage', torch.FloatStorage, key, location, numel)`.
    Storage(String, Kind),
    Tensor(TensorRef),
}

fn storage_kind(global: &str) -> Option<Kind> {
    Some(match global.strip_prefix("torch.")? {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn ints(v: &V) -> Result<Vec<i64>> {
    match v {
        V::Tuple(items) => {
            items.iter().map(|x| if let V::Int(i) = x { Ok(*i) } else { bail!("expected int") }).collect()
        }
        _ => bail!("expected a tuple of ints"),
    }
}

#[derive(Default)]
struct Unpickler {
    stack: Vec<V>,
    memo: HashMap<u64, V>,
}

impl Unpickler {
    fn pop(&mut self) -> Result<V> {
        self.stack.pop().ok_or_else(|| anyhow!("pickle stack underflow"))
    }

    /// Pops everything above the topmost mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<V>> {
        let at = self.stack.iter().rposition(|v| matches!(v, V::Mark)).ok_or_else(|| anyhow!("no mark"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut V> {
        self.stack.last_mut().ok_or_else(|| anyhow!("pickle stack underflow"))
    }

    fn run(mut self, b: &[u8]) -> Result<V> {
        let mut i = 0usize;
        let take = |i: &mut usize, n: usize| -> Result<&[u8]> {
            let s = b.get(*i..*i + n).ok_or_else(|| anyhow!("truncated pickle"))?;
            *i += n;
            Ok(s)
        };
        loop {
            let at = i;
            let op = take(&mut i, 1)?[0];
            match op {
                0x80 => drop(take(&mut i, 1)?), // PROTO
                0x95 => drop(take(&mut i, 8)?), // FRAME
                b'.' => return self.pop(),
                b'(' => self.stack.push(V::Mark),
                b')' => self.stack.push(V::Tuple(vec![])),
                b']' => self.stack.push(V::List(vec![])),
                b'}' => self.stack.push(V::Dict(vec![])),
                b'N' => self.stack.push(V::None),
                0x88 | 0x89 => self.stack.push(V::Bool),
                b'J' => self.stack.push(V::Int(i32::from_le_bytes(take(&mut i, 4)?.try_into()?) as i64)),
                b'K' => self.stack.push(V::Int(take(&mut i, 1)?[0] as i64)),
                b'M' => self.stack.push(V::Int(u16::from_le_bytes(take(&mut i, 2)?.try_into()?) as i64)),
                0x8a => {
                    let n = take(&mut i, 1)?[0] as usize;
                    let digits = take(&mut i, n)?;
                    if n > 8 {
                        bail!("integer too large at byte {at}");
                    }
                    let mut buf = if digits.last().is_some_and(|d| d & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(digits);
                    self.stack.push(V::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    take(&mut i, 8)?;
                    self.stack.push(V::Float);
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => u32::from_le_bytes(take(&mut i, 4)?.try_into()?) as usize,
                        0x8c => take(&mut i, 1)?[0] as usize,
                        _ => u64::from_le_bytes(take(&mut i, 8)?.try_into()?) as usize,
                    };
                    self.stack.push(V::Str(String::from_utf8(take(&mut i, n)?.to_vec())?));
                }
                b'c' => {
                    let end = |i: usize| b[i..].iter().position(|&c| c == b'\n').map(|p| i + p);
                    let m_end = end(i).ok_or_else(|| anyhow!("truncated GLOBAL"))?;
                    let n_end = end(m_end + 1).ok_or_else(|| anyhow!("truncated GLOBAL"))?;
                    let module = String::from_utf8_lossy(&b[i..m_end]);
                    let name = String::from_utf8_lossy(&b[m_end + 1..n_end]);
                    self.stack.push(V::Global(format!("{module}.{name}")));
                    i = n_end + 1;
                }
                0x93 => {
                    let (V::Str(name), V::Str(module)) = (self.pop()?, self.pop()?) else { bail!("bad STACK_GLOBAL") };
                    self.stack.push(V::Global(format!("{module}.{name}")));
                }
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => take(&mut i, 1)?[0] as u64,
                        b'r' => u32::from_le_bytes(take(&mut i, 4)?.try_into()?) as u64,
                        _ => self.memo.len() as u64,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(key, v);
                }
                b'h' | b'j' => {
                    let key = if op == b'h' {
                        take(&mut i, 1)?[0] as u64
                    } else {
                        u32::from_le_bytes(take(&mut i, 4)?.try_into()?) as u64
                    };
                    let v = self.memo.get(&key).cloned().ok_or_else(|| anyhow!("memo {key} unset"))?;
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(V::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self.stack.len().checked_sub(n).ok_or_else(|| anyhow!("pickle stack underflow"))?;
                    let items = self.stack.split_off(at);
                    self.stack.push(V::Tuple(items));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let V::List(list) = self.top()? else { bail!("APPEND to a non-list at byte {at}") };
                    list.extend(items);
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        vec![self.pop()?, v]
                    } else {
                        self.pop_mark()?
                    };
                    let V::Dict(dict) = self.top()? else { bail!("SETITEM on a non-dict at byte {at}") };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        dict.push((k, v));
                    }
                }
                b'b' => drop(self.pop()?), // BUILD: object state (OrderedDict._metadata), unused
                b'Q' => {
                    let pid = self.pop()?;
                    let V::Tuple(p) = &pid else { bail!("unsupported persistent id at byte {at}") };
                    match (p.first(), p.get(1), p.get(2)) {
                        (Some(V::Str(tag)), Some(V::Global(ty)), Some(V::Str(key))) if tag == "storage" => {
                            let kind = storage_kind(ty).ok_or_else(|| anyhow!("unsupported storage type {ty}"))?;
                            self.stack.push(V::Storage(key.clone(), kind));
                        }
                        _ => bail!("unsupported persistent id at byte {at}"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let V::Global(func) = self.pop()? else { bail!("REDUCE on a non-global at byte {at}") };
                    let V::Tuple(args) = args else { bail!("REDUCE without an argument tuple at byte {at}") };
                    let v = self.reduce(&func, args).with_context(|| format!("calling {func} at byte {at}"))?;
                    self.stack.push(v);
                }
                _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {at}: not a plain state dict"),
            }
        }
    }

    /// The only callables a state dict needs, interpreted rather than called.
    fn reduce(&self, func: &str, args: Vec<V>) -> Result<V> {
        match func {
            "collections.OrderedDict" => Ok(V::Dict(vec![])),
            "torch._utils._rebuild_tensor_v2" => {
                let (Some(V::Storage(key, kind)), Some(V::Int(offset)), Some(size), Some(stride)) =
                    (args.first(), args.get(1), args.get(2), args.get(3))
                else {
                    bail!("unexpected arguments");
                };
                Ok(V::Tensor(TensorRef {
                    key: key.clone(),
                    kind: *kind,
                    offset: *offset,
                    size: ints(size)?,
                    stride: ints(stride)?,
                }))
            }
            "torch._utils._rebuild_parameter" => args.into_iter().next().ok_or_else(|| anyhow!("no data")),
            other => bail!("the pickle calls {other}, which a plain state dict does not; refusing to load it"),
        }
    }
}
