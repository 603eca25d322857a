//! On-disk cache of compiled kernels, so NVRTC runs once per source, option set and
//! architecture, and a machine with a driver but no NVRTC (a GPU host that got the cache from
//! a build machine, see `scripts/gpu-check.sh`) can still load every kernel.
//!
//! A file is named `<source>-<arch>-<key>.<cubin|ptx>` where the key hashes the cache format,
//! the full source text, the compile options and the architecture. The NVRTC version is not
//! part of the key (loading from the cache must not need NVRTC); delete the directory after
//! changing NVRTC if bit-identical code generation matters. Writes go to a temporary file
//! renamed into place, so concurrent processes never read half a file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{CudaError, Result};
use super::nvrtc::{self, Arch};
use super::sources::KernelSource;

/// Environment variable overriding the cache directory.
pub const CACHE_DIR_ENV: &str = "INDEXRELAY_KERNEL_CACHE";

/// Bumped when the file layout or key recipe changes.
const CACHE_FORMAT: &str = "indexrelay-kernel-cache-v1";

/// Where a compiled kernel came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the cache directory.
    Hit,
    /// Compiled by NVRTC now (and stored).
    Compiled,
}

/// A directory of compiled kernels.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: PathBuf,
}

/// 64-bit FNV-1a, fed field by field with length prefixes (no ambiguity between fields).
struct Fnv(u64);

impl Fnv {
    fn new(seed: u64) -> Self {
        Fnv(0xcbf2_9ce4_8422_2325 ^ seed)
    }
    fn field(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The cache key of `source` compiled with `options` for `arch`: 128 bits as 32 hex digits
/// (two independently seeded FNV-1a passes).
pub fn cache_key(source: &KernelSource, options: &[String], arch: &Arch) -> String {
    let text = source.full_text();
    let arch = arch.to_string();
    let mut parts: Vec<&[u8]> = vec![
        CACHE_FORMAT.as_bytes(),
        source.name.as_bytes(),
        text.as_bytes(),
        arch.as_bytes(),
    ];
    parts.extend(options.iter().map(|o| o.as_bytes()));
    let digest = |seed: u64| {
        let mut h = Fnv::new(seed);
        parts.iter().for_each(|p| h.field(p));
        h.0
    };
    format!("{:016x}{:016x}", digest(0), digest(0x9e37_79b9_7f4a_7c15))
}

impl KernelCache {
    /// A cache in `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KernelCache { dir: dir.into() }
    }

    /// The default location: `$INDEXRELAY_KERNEL_CACHE`, else `$XDG_CACHE_HOME/indexrelay/kernels`,
    /// else `~/.cache/indexrelay/kernels`, else a directory under the system temp dir.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let dir = env(CACHE_DIR_ENV)
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("indexrelay/kernels")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/indexrelay/kernels")))
            .unwrap_or_else(|| std::env::temp_dir().join("indexrelay-kernels"));
        KernelCache { dir }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `source` compiled for `arch`.
    pub fn path_for(&self, source: &KernelSource, arch: &Arch) -> PathBuf {
        let key = cache_key(source, &nvrtc::options_for(arch), arch);
        let ext = if arch.is_real() { "cubin" } else { "ptx" };
        let stem = source.name.trim_end_matches(".cu");
        self.dir.join(format!("{stem}-{arch}-{key}.{ext}"))
    }

    /// The compiled image of `source` for `arch`: from the cache when present (no NVRTC
    /// needed), else compiled with NVRTC and stored.
    pub fn load_or_compile(&self, source: &KernelSource, arch: &Arch) -> Result<(Vec<u8>, CacheOutcome)> {
        let path = self.path_for(source, arch);
        match fs::read(&path) {
            Ok(bytes) if !bytes.is_empty() => return Ok((bytes, CacheOutcome::Hit)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CudaError::Cache { path, source }),
        }
        let bytes = nvrtc::compile(source, arch)?;
        self.store(&path, &bytes)?;
        Ok((bytes, CacheOutcome::Compiled))
    }

    fn store(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CudaError::Cache { path: p, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name().and_then(|n| n.to_str()).unwrap_or("kernel")
        ));
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io(path))
    }
}
