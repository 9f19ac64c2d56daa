//! Model parameters in host memory: reading and writing safetensors with Hugging Face names.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("`{path}`: tensor `{name}` is {dtype}; edpo bundles are float32")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("`{path}` lacks parameter `{name}` that the bundle's model needs")]
    Missing { path: PathBuf, name: String },
    #[error("`{path}`: parameter `{name}` has shape {got:?}, the bundle's model has {want:?}")]
    Shape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("`{path}` has tensor `{name}`, which is not a parameter of the bundle's model")]
    Unexpected { path: PathBuf, name: String },
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
}

/// One named float32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The parameters of a model, in the bundle manifest's order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamStore {
    pub params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new(params: Vec<Param>) -> Self {
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        ParamStore { params, index }
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// One zero-filled buffer per parameter (gradients, optimiser moments), in store order,
    /// resident (its pages faulted in here, see `resident`).
    pub fn zeros_like(&self) -> Vec<Vec<f32>> {
        self.params
            .iter()
            .map(|p| resident(zeroed(p.data.len())))
            .collect()
    }

    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.data.len()).sum()
    }

    /// Reads `path`, requiring exactly the tensors and shapes in `layout` (name, shape).
    pub fn load(path: &Path, layout: &[(String, Vec<usize>)]) -> Result<Self, ParamsError> {
        let bytes = std::fs::read(path).map_err(|source| ParamsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| ParamsError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let wanted: HashMap<&str, &Vec<usize>> =
            layout.iter().map(|(n, s)| (n.as_str(), s)).collect();
        for name in tensors.names() {
            if !wanted.contains_key(name) {
                return Err(ParamsError::Unexpected {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                });
            }
        }
        let mut params = Vec::with_capacity(layout.len());
        for (name, shape) in layout {
            let view = tensors.tensor(name).map_err(|_| ParamsError::Missing {
                path: path.to_path_buf(),
                name: name.clone(),
            })?;
            if view.dtype() != Dtype::F32 {
                return Err(ParamsError::Dtype {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            if view.shape() != shape.as_slice() {
                return Err(ParamsError::Shape {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    got: view.shape().to_vec(),
                    want: shape.clone(),
                });
            }
            params.push(Param {
                name: name.clone(),
                shape: shape.clone(),
                data: f32_from_le_bytes(view.data()),
            });
        }
        Ok(ParamStore::new(params))
    }

    /// Reads only the float32 tensors `names` of a safetensors file (seeking to each, so a
    /// few tensors of a large file cost their own size), in the order given.
    pub fn load_named(path: &Path, names: &[String]) -> Result<Self, ParamsError> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |source| ParamsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let format = |message: String| ParamsError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io)?;
        let header_len = usize::try_from(u64::from_le_bytes(len))
            .ok()
            .filter(|&n| n <= 100 << 20)
            .ok_or_else(|| format("header length out of range".into()))?;
        let mut header = vec![0u8; header_len];
        file.read_exact(&mut header).map_err(io)?;
        let header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| format(e.to_string()))?;
        let mut params = Vec::with_capacity(names.len());
        for name in names {
            let entry = header.get(name).ok_or_else(|| ParamsError::Missing {
                path: path.to_path_buf(),
                name: name.clone(),
            })?;
            let dtype = entry["dtype"].as_str().unwrap_or("?");
            if dtype != "F32" {
                return Err(ParamsError::Dtype {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    dtype: dtype.to_string(),
                });
            }
            let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone())
                .map_err(|e| format(format!("`{name}`: {e}")))?;
            let [begin, end]: [u64; 2] = serde_json::from_value(entry["data_offsets"].clone())
                .map_err(|e| format(format!("`{name}`: {e}")))?;
            if end - begin != 4 * shape.iter().product::<usize>() as u64 {
                return Err(format(format!(
                    "`{name}`: data length does not match its shape"
                )));
            }
            let mut bytes = vec![0u8; (end - begin) as usize];
            file.seek(SeekFrom::Start(8 + header_len as u64 + begin))
                .map_err(io)?;
            file.read_exact(&mut bytes).map_err(io)?;
            params.push(Param {
                name: name.clone(),
                shape,
                data: f32_from_le_bytes(&bytes),
            });
        }
        Ok(ParamStore::new(params))
    }

    /// Writes the parameters as a safetensors file (atomically: temporary file, then rename).
    pub fn save(
        &self,
        path: &Path,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<(), ParamsError> {
        let tensors: Vec<(String, &[usize], &[f32])> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.as_slice(), p.data.as_slice()))
            .collect();
        save_tensors(path, &tensors, metadata)
    }
}

/// Writes float32 tensors (name, shape, values) as a safetensors file, atomically (temporary
/// file, then rename), streaming the values from their buffers (no copy of them in memory).
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, &[usize], &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ParamsError> {
    let write_err = |message: String| ParamsError::Write {
        path: path.to_path_buf(),
        message,
    };
    let bytes: Vec<Cow<'_, [u8]>> = tensors.iter().map(|(_, _, v)| le_bytes(v)).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), bytes) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, shape.to_vec(), bytes)
            .map_err(|e| write_err(e.to_string()))?;
        views.push((name.clone(), view));
    }
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::tensor::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| write_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| write_err(e.to_string()))
}

/// `values` as safetensors stores them, little-endian float32 bytes: the buffer itself on a
/// little-endian machine, a copy elsewhere.
fn le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    let mut values = zeroed(bytes.len() / 4);
    for (v, c) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    values
}

/// Buffers from this size on are asked for transparent huge pages.
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// `len` zeros, in memory asked for transparent huge pages when it spans at least one (Linux,
/// `madvise` mode): fewer page faults for parameter-sized buffers. The zeros come from the
/// allocator's zeroed memory, written by no one; `resident` faults such a buffer in at once.
pub fn zeroed(len: usize) -> Vec<f32> {
    let bytes = len * std::mem::size_of::<f32>();
    if bytes < 2 * HUGE_PAGE_BYTES {
        return vec![0.0; len];
    }
    let layout = std::alloc::Layout::array::<f32>(len).expect("buffer size fits in memory");
    // SAFETY: `layout` is non-zero-sized; the memory is zeroed (a valid f32 array) and owned
    // by the Vec with the same layout (capacity = length = `len`, f32 alignment).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<f32>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        advise_huge_pages(ptr.cast(), bytes);
        Vec::from_raw_parts(ptr, len, len)
    }
}

/// Asks the kernel for huge pages over the whole huge pages inside `[start, start + bytes)`
/// (advice only: ignored where the kernel does not offer them).
#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *mut u8, bytes: usize) {
    let first = (start as usize).next_multiple_of(HUGE_PAGE_BYTES);
    let end = (start as usize + bytes) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    if end > first {
        // SAFETY: the range lies inside one live allocation; MADV_HUGEPAGE changes no contents.
        unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *mut u8, _bytes: usize) {}

/// `buffer` with every page faulted in by this thread, in order. Left to the first parallel
/// pass over it (rayon's threads faulting a fresh buffer's pages at once), SmolLM2's 1.08 GB of
/// AdamW moments took 1.5 s of the first optimiser step on this repo's machine; faulted in here,
/// 0.26–0.34 s. (On a multi-socket machine first touch places every page on this thread's
/// memory node, where the parallel passes then read it; not measured here, one node.)
fn resident(mut buffer: Vec<f32>) -> Vec<f32> {
    const PAGE_FLOATS: usize = 4096 / std::mem::size_of::<f32>();
    for page in buffer.chunks_mut(PAGE_FLOATS) {
        // black_box: the zero it already holds, stored all the same.
        page[0] = std::hint::black_box(0.0);
    }
    buffer
}

pub fn i64_from_le_bytes(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}
