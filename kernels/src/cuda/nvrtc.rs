//! NVRTC: finding the library, the target architecture, and compiling one source to a
//! CUBIN (`sm_XY`, loads without a JIT step and on older 12.x drivers) or PTX (`compute_XY`).

use std::ffi::{c_char, CString};
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use super::error::{CudaError, Result};
use super::sources::KernelSource;

/// Environment variable naming an NVRTC shared library by path (e.g. the one in PyPI's
/// `nvidia-cuda-nvrtc-cu12` wheel). It is loaded before cudarc looks NVRTC up by name, and
/// the dynamic loader then resolves the name to the already loaded library.
pub const NVRTC_LIB_ENV: &str = "INDEXRELAY_NVRTC_LIB";

/// Options every kernel is compiled with (beside the architecture). No fast-math: the
/// kernels mirror the CPU's rounding where it is exact (see `cuda/common.cuh`).
pub const COMPILE_OPTIONS: &[&str] = &["--std=c++17"];

/// A compilation target: real (`sm_90`, output CUBIN) or virtual (`compute_90`, output PTX).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Compute capability digits plus optional suffix, e.g. "90", "90a", "120".
    version: String,
    /// `true` for `sm_` (CUBIN), `false` for `compute_` (PTX).
    real: bool,
}

impl Arch {
    /// The real architecture of a device with this compute capability.
    pub fn from_compute_capability(major: i32, minor: i32) -> Self {
        Arch {
            version: format!("{major}{minor}"),
            real: true,
        }
    }

    /// Whether NVRTC produces a CUBIN (else PTX) for this target.
    pub fn is_real(&self) -> bool {
        self.real
    }

    /// The compute capability as a number (e.g. 90 for sm_90a).
    pub fn number(&self) -> u32 {
        let digits: String = self.version.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().unwrap_or(0)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = if self.real { "sm" } else { "compute" };
        write!(f, "{prefix}_{}", self.version)
    }
}

impl FromStr for Arch {
    type Err = CudaError;

    /// Parses `sm_80`, `sm_90a`, `compute_90`, ...; the kernels need compute capability 7.0
    /// or newer (warp match intrinsics).
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            |why: &str| CudaError::invalid("arch", format!("{s:?}: {why} (expected e.g. sm_80, sm_90, compute_90)"));
        let (real, rest) = if let Some(r) = s.strip_prefix("sm_") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("compute_") {
            (false, r)
        } else {
            return Err(bad("must start with sm_ or compute_"));
        };
        let digits = rest.trim_end_matches(['a', 'f']);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || rest.len() - digits.len() > 1 {
            return Err(bad("must be digits with an optional a/f suffix"));
        }
        let arch = Arch {
            version: rest.to_string(),
            real,
        };
        if arch.number() < 70 {
            return Err(bad("compute capability 7.0 or newer is required"));
        }
        Ok(arch)
    }
}

/// Checks that NVRTC can be loaded, first loading [`NVRTC_LIB_ENV`] if it is set. Returns a
/// structured error instead of cudarc's panic when it is missing.
pub fn ensure_nvrtc() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        if let Ok(path) = std::env::var(NVRTC_LIB_ENV) {
            // SAFETY: loading NVRTC runs only its initializers; the handle is leaked so the
            // library stays loaded for cudarc's later lookup by name.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => std::mem::forget(lib),
                Err(e) => return Err(format!("{NVRTC_LIB_ENV}={path} could not be loaded: {e}")),
            }
        }
        // SAFETY: only tries to dlopen the candidate names.
        if unsafe { sys::is_culib_present() } {
            Ok(())
        } else {
            Err(format!(
                "libnvrtc (.so.13 or .so.12) was not found; install PyPI's nvidia-cuda-nvrtc (or the CUDA toolkit) and put \
                 its lib directory on LD_LIBRARY_PATH, or set {NVRTC_LIB_ENV} to the library's path"
            ))
        }
    });
    state
        .clone()
        .map_err(|hint| CudaError::LibraryMissing { library: "NVRTC", hint })
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_err("querying the version", e))?;
    Ok((major, minor))
}

fn nvrtc_err(context: &str, e: impl fmt::Display) -> CudaError {
    CudaError::Nvrtc {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// The full option list for `arch`.
pub fn options_for(arch: &Arch) -> Vec<String> {
    let mut opts: Vec<String> = COMPILE_OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `source` for `arch`: CUBIN bytes for a real arch, PTX text (no trailing NUL) for a
/// virtual one. Compile errors carry NVRTC's log.
pub fn compile(source: &KernelSource, arch: &Arch) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let text = CString::new(source.full_text())
        .map_err(|_| CudaError::invalid("source", format!("{} contains a NUL byte", source.name)))?;
    let name = CString::new(source.name).map_err(|_| CudaError::invalid("source", "name contains a NUL byte"))?;
    let prog = Program(result::create_program(&text, Some(&name)).map_err(|e| nvrtc_err("creating a program", e))?);
    let options = options_for(arch);
    // SAFETY: prog is a live program; options are plain strings.
    if let Err(e) = unsafe { result::compile_program(prog.0, &options) } {
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|l| c_buf_to_string(&l))
            .unwrap_or_else(|_| format!("{e} (no log)"));
        return Err(CudaError::Compile {
            source_name: source.name.to_string(),
            arch: arch.to_string(),
            log,
        });
    }
    if arch.is_real() {
        let mut size = 0usize;
        // SAFETY: prog compiled successfully; buffer sized by NVRTC.
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
            .result()
            .map_err(|e| nvrtc_err("sizing the CUBIN", e))?;
        let mut buf = vec![0u8; size];
        // SAFETY: buf holds `size` bytes.
        unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| nvrtc_err("reading the CUBIN", e))?;
        Ok(buf)
    } else {
        // SAFETY: prog compiled successfully.
        let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| nvrtc_err("reading the PTX", e))?;
        Ok(c_buf_to_string(&ptx).into_bytes())
    }
}

/// The entry points (`.entry` names) of a PTX text, for checks.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(".visible .entry ")?;
            Some(rest.split(['(', ' ']).next()?.to_string())
        })
        .collect()
}
