//! Model parameters in host memory: reading and writing safetensors with Hugging Face names.

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

    /// One zero-filled buffer per parameter (gradients, optimiser moments), in store order.
    pub fn zeros_like(&self) -> Vec<Vec<f32>> {
        self.params
            .iter()
            .map(|p| vec![0.0; p.data.len()])
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
        let write_err = |message: String| ParamsError::Write {
            path: path.to_path_buf(),
            message,
        };
        let bytes: Vec<Vec<u8>> = self
            .params
            .iter()
            .map(|p| p.data.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let mut views = Vec::with_capacity(self.params.len());
        for (p, b) in self.params.iter().zip(&bytes) {
            let view = TensorView::new(Dtype::F32, p.shape.clone(), b)
                .map_err(|e| write_err(e.to_string()))?;
            views.push((p.name.clone(), view));
        }
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::tensor::serialize_to_file(views, metadata, &tmp)
            .map_err(|e| write_err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| write_err(e.to_string()))
    }
}

pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn i64_from_le_bytes(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}
