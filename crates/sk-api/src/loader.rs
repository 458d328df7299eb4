//! Loading a middleware and calling it: owned Rust values in, owned Rust
//! values out.
//!
//! As OpenSSH's `ssh-sk.c` does: `dlopen(path, RTLD_NOW)`, look up
//! `sk_api_version` and refuse a library whose major version is not 0x000a,
//! then look up the three operations. Whatever the library returns was
//! allocated with `malloc(3)` and is released here with `free(3)`, field by
//! field and then the structure, after it has been copied into Rust values.

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::ptr;

use libc::{c_void, size_t};
use libloading::os::unix::{Library as DlLibrary, RTLD_LOCAL, RTLD_NOW};
use zeroize::Zeroizing;

use crate::ffi;
use crate::{
    EnrollRequest, EnrollResponse, ResidentKey, SignRequest, SignResponse, SkError, SkOption,
    API_VERSION, API_VERSION_MAJOR_MASK,
};

/// The most bytes any buffer a middleware returns may claim. Far above any
/// key, handle, signature or certificate; a larger length means a corrupt
/// answer, which is refused rather than read.
const MAX_BUFFER: usize = 1 << 20;

/// The most resident keys an answer may claim (devices hold a few dozen).
const MAX_RESIDENT_KEYS: usize = 4096;

/// Why a middleware could not be loaded or did not answer usefully.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// `dlopen` failed: no such file, not a shared library, a missing
    /// dependency, or the wrong architecture.
    #[error("cannot load {path}: {message}")]
    Open {
        /// The library.
        path: PathBuf,
        /// dlerror's words.
        message: String,
    },
    /// The library lacks one of the four functions: it is not an OpenSSH
    /// security-key middleware.
    #[error("{path} is not an OpenSSH security-key middleware: it has no {symbol} ({message})")]
    Symbol {
        /// The library.
        path: PathBuf,
        /// The missing function.
        symbol: &'static str,
        /// dlerror's words.
        message: String,
    },
    /// The library implements another major version of the API (an older or
    /// newer OpenSSH's).
    #[error(
        "{path} implements sk-api version {found:#010x}; this build speaks {API_VERSION:#010x} \
         (OpenSSH 8.9 and later, 10.5 included)"
    )]
    Version {
        /// The library.
        path: PathBuf,
        /// What its `sk_api_version` returned.
        found: u32,
    },
    /// The middleware returned an error code.
    #[error(transparent)]
    Middleware(#[from] SkError),
    /// The middleware reported success but its answer is unusable (a NULL
    /// response, a NULL buffer with a length, an absurd length).
    #[error("the middleware returned a malformed answer: {0}")]
    Malformed(&'static str),
    /// An argument cannot be passed to C (a NUL byte inside a string).
    #[error("cannot pass {0} to the middleware: it contains a NUL byte")]
    Argument(&'static str),
}

/// A loaded middleware library.
///
/// It may move to another thread but is not `Sync`: OpenSSH calls a
/// middleware from one thread at a time, and nothing promises that a
/// middleware copes with two calls at once.
pub struct Library {
    path: PathBuf,
    version: u32,
    enroll: ffi::sk_enroll_fn,
    sign: ffi::sk_sign_fn,
    load_resident_keys: ffi::sk_load_resident_keys_fn,
    _one_thread_at_a_time: PhantomData<Cell<()>>,
    // Declared last: the function pointers above point into it, so it must
    // stay loaded as long as they exist. It is closed when this is dropped.
    _library: DlLibrary,
}

impl Library {
    /// Loads the middleware at `path` and checks its API version.
    ///
    /// This runs the library's initialisers and, through `sk_api_version`,
    /// its code: call it only in a process that may crash or be killed (a
    /// helper), never in the agent itself.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref().to_path_buf();
        // SAFETY: dlopen runs the library's initialisers, arbitrary code we
        // cannot check. That is the contract of a middleware, and the reason
        // this is only ever called in a helper process whose crash costs
        // nothing but itself. RTLD_LOCAL keeps its symbols from resolving
        // anyone else's.
        let library =
            unsafe { DlLibrary::open(Some(&path), RTLD_NOW | RTLD_LOCAL) }.map_err(|err| {
                LoadError::Open {
                    path: path.clone(),
                    message: err.to_string(),
                }
            })?;
        let symbol_error = |symbol: &'static str, err: libloading::Error| LoadError::Symbol {
            path: path.clone(),
            symbol,
            message: err.to_string(),
        };
        // SAFETY: the symbol is declared in sk-api.h as `uint32_t
        // sk_api_version(void)`, which is exactly `sk_api_version_fn`. If the
        // library defines the name with another type, calling it is undefined
        // behaviour we cannot detect; OpenSSH takes the same risk.
        let version_fn: ffi::sk_api_version_fn =
            *unsafe { library.get::<ffi::sk_api_version_fn>(b"sk_api_version\0") }
                .map_err(|e| symbol_error("sk_api_version", e))?;
        // SAFETY: a function of no arguments returning a u32, per the header;
        // the library stays loaded for the call.
        let version = unsafe { version_fn() };
        if version & API_VERSION_MAJOR_MASK != API_VERSION {
            return Err(LoadError::Version {
                path,
                found: version,
            });
        }
        // SAFETY: the type is the header's prototype for this name (see
        // `ffi`); a library of the right version declares it so. The pointer
        // is copied out of the `Symbol` and stays valid while `_library` is
        // loaded, which is as long as `Self` lives. The same holds for the
        // two lookups below.
        let enroll = *unsafe { library.get::<ffi::sk_enroll_fn>(b"sk_enroll\0") }
            .map_err(|e| symbol_error("sk_enroll", e))?;
        // SAFETY: as above.
        let sign = *unsafe { library.get::<ffi::sk_sign_fn>(b"sk_sign\0") }
            .map_err(|e| symbol_error("sk_sign", e))?;
        // SAFETY: as above.
        let load_resident_keys =
            *unsafe { library.get::<ffi::sk_load_resident_keys_fn>(b"sk_load_resident_keys\0") }
                .map_err(|e| symbol_error("sk_load_resident_keys", e))?;
        Ok(Self {
            path,
            version,
            enroll,
            sign,
            load_resident_keys,
            _one_thread_at_a_time: PhantomData,
            _library: library,
        })
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What its `sk_api_version` returned.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// `sk_enroll`: makes a credential.
    pub fn enroll(&self, request: &EnrollRequest<'_>) -> Result<EnrollResponse, LoadError> {
        let application = c_string(request.application, "the application")?;
        let pin = request.pin.map(c_pin).transpose()?;
        let mut options = COptions::new(request.options)?;
        let mut response: *mut ffi::sk_enroll_response = ptr::null_mut();
        // SAFETY: every pointer argument is valid for the call: the challenge
        // slice with its length, NUL-terminated strings that outlive the
        // call, a NULL-terminated option array (or NULL) that outlives it, and
        // a place for the response. The middleware's side of the contract
        // (sk-api.h) is trusted, as OpenSSH trusts it.
        let code = unsafe {
            (self.enroll)(
                request.algorithm.code(),
                request.challenge.as_ptr(),
                request.challenge.len(),
                application.as_ptr(),
                request.flags,
                pin.as_ref().map_or(ptr::null(), |p| p.as_ptr().cast()),
                options.as_mut_ptr(),
                &mut response,
            )
        };
        // SAFETY: `response` is NULL or what the middleware allocated for
        // us, per the header; it is taken over once, here.
        let owned = unsafe { take_enroll_response(response) };
        if code != 0 {
            return Err(SkError::from_code(code).into());
        }
        owned?.ok_or(LoadError::Malformed("sk_enroll succeeded with no response"))
    }

    /// `sk_sign`: signs `data` with a key handle.
    pub fn sign(&self, request: &SignRequest<'_>) -> Result<SignResponse, LoadError> {
        let application = c_string(request.application, "the application")?;
        let pin = request.pin.map(c_pin).transpose()?;
        let mut options = COptions::new(request.options)?;
        let mut response: *mut ffi::sk_sign_response = ptr::null_mut();
        // SAFETY: as for `enroll`: valid slices with their lengths,
        // NUL-terminated strings and an option array that outlive the call,
        // and a place for the response.
        let code = unsafe {
            (self.sign)(
                request.algorithm.code(),
                request.data.as_ptr(),
                request.data.len(),
                application.as_ptr(),
                request.key_handle.as_ptr(),
                request.key_handle.len(),
                request.flags,
                pin.as_ref().map_or(ptr::null(), |p| p.as_ptr().cast()),
                options.as_mut_ptr(),
                &mut response,
            )
        };
        // SAFETY: `response` is NULL or the middleware's allocation, taken over once.
        let owned = unsafe { take_sign_response(response) };
        if code != 0 {
            return Err(SkError::from_code(code).into());
        }
        owned?.ok_or(LoadError::Malformed("sk_sign succeeded with no response"))
    }

    /// `sk_load_resident_keys`: every resident credential (the PIN is usually needed).
    pub fn load_resident_keys(
        &self,
        pin: Option<&str>,
        options: &[SkOption],
    ) -> Result<Vec<ResidentKey>, LoadError> {
        let pin = pin.map(c_pin).transpose()?;
        let mut options = COptions::new(options)?;
        let mut keys: *mut *mut ffi::sk_resident_key = ptr::null_mut();
        let mut count: size_t = 0;
        // SAFETY: a NUL-terminated PIN (or NULL) and an option array that
        // outlive the call, and places for the array and its length.
        let code = unsafe {
            (self.load_resident_keys)(
                pin.as_ref().map_or(ptr::null(), |p| p.as_ptr().cast()),
                options.as_mut_ptr(),
                &mut keys,
                &mut count,
            )
        };
        // SAFETY: `keys` is NULL or an array of `count` pointers the
        // middleware allocated, each NULL or its allocation; taken over once.
        let owned = unsafe { take_resident_keys(keys, count) };
        if code != 0 {
            return Err(SkError::from_code(code).into());
        }
        owned
    }
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("version", &format_args!("{:#010x}", self.version))
            .finish_non_exhaustive()
    }
}

/// Options as C wants them: a NULL-terminated array of pointers to
/// `sk_option`s whose strings live as long as this does.
struct COptions {
    // The strings and structures the pointers point into; never touched again
    // until dropped, so the pointers stay valid.
    _strings: Vec<CString>,
    _options: Vec<ffi::sk_option>,
    pointers: Vec<*mut ffi::sk_option>,
}

impl COptions {
    fn new(options: &[SkOption]) -> Result<Self, LoadError> {
        let mut strings = Vec::with_capacity(options.len() * 2);
        let mut structs = Vec::with_capacity(options.len());
        for option in options {
            let name = c_string(&option.name, "an option name")?;
            let value = c_string(&option.value, "an option value")?;
            structs.push(ffi::sk_option {
                // The middleware receives `char *` but must not write or free
                // them (OpenSSH frees its own options after the call).
                name: name.as_ptr().cast_mut(),
                value: value.as_ptr().cast_mut(),
                required: u8::from(option.required),
            });
            strings.push(name);
            strings.push(value);
        }
        let mut pointers: Vec<*mut ffi::sk_option> =
            structs.iter_mut().map(ptr::from_mut).collect();
        pointers.push(ptr::null_mut());
        Ok(Self {
            _strings: strings,
            _options: structs,
            pointers,
        })
    }

    /// The array, or NULL when there are no options (as OpenSSH passes it).
    fn as_mut_ptr(&mut self) -> *mut *mut ffi::sk_option {
        if self.pointers.len() == 1 {
            ptr::null_mut()
        } else {
            self.pointers.as_mut_ptr()
        }
    }
}

fn c_string(text: &str, what: &'static str) -> Result<CString, LoadError> {
    CString::new(text).map_err(|_| LoadError::Argument(what))
}

/// The PIN as a NUL-terminated buffer that is wiped when dropped.
fn c_pin(pin: &str) -> Result<Zeroizing<Vec<u8>>, LoadError> {
    if pin.as_bytes().contains(&0) {
        return Err(LoadError::Argument("the PIN"));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(pin.len() + 1));
    bytes.extend_from_slice(pin.as_bytes());
    bytes.push(0);
    Ok(bytes)
}

/// Copies `len` bytes at `data` and frees `data`.
///
/// # Safety
///
/// `data` is NULL or a `malloc` allocation of at least `len` readable bytes
/// that nothing else will use or free.
unsafe fn take_buffer(data: *mut u8, len: size_t) -> Result<Vec<u8>, LoadError> {
    if data.is_null() {
        return if len == 0 {
            Ok(Vec::new())
        } else {
            Err(LoadError::Malformed("a NULL buffer with a length"))
        };
    }
    if len > MAX_BUFFER {
        // Reading or freeing what a corrupt answer points to could do more
        // harm than leaking it; the helper process ends soon enough.
        return Err(LoadError::Malformed("a buffer longer than 1 MiB"));
    }
    // SAFETY: per this function's contract, `data` points to `len` readable
    // bytes (len > 0 or not, a non-NULL pointer is valid for a 0-length slice).
    let copy = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
    // SAFETY: `data` came from malloc and is freed once, here.
    unsafe { libc::free(data.cast::<c_void>()) };
    Ok(copy)
}

/// Copies and frees the buffers of an enrol response, not the structure itself.
///
/// # Safety
///
/// Every pointer field is NULL or a `malloc` allocation of its length field's
/// size that nothing else will use or free.
unsafe fn take_enroll_fields(
    response: &ffi::sk_enroll_response,
) -> Result<EnrollResponse, LoadError> {
    // Every buffer is taken (and freed) even when an earlier one is malformed.
    // SAFETY: per this function's contract.
    let public_key = unsafe { take_buffer(response.public_key, response.public_key_len) };
    // SAFETY: per this function's contract.
    let key_handle = unsafe { take_buffer(response.key_handle, response.key_handle_len) };
    // SAFETY: per this function's contract.
    let signature = unsafe { take_buffer(response.signature, response.signature_len) };
    // SAFETY: per this function's contract.
    let attestation_cert =
        unsafe { take_buffer(response.attestation_cert, response.attestation_cert_len) };
    // SAFETY: per this function's contract.
    let authdata = unsafe { take_buffer(response.authdata, response.authdata_len) };
    Ok(EnrollResponse {
        flags: response.flags,
        public_key: public_key?,
        key_handle: key_handle?,
        signature: signature?,
        attestation_cert: attestation_cert?,
        authdata: authdata?,
    })
}

/// Takes over an `sk_enroll_response`: copies it and frees it.
///
/// # Safety
///
/// `response` is NULL or a `malloc`ed structure whose buffers follow
/// [`take_enroll_fields`]'s contract, used by nothing else afterwards.
unsafe fn take_enroll_response(
    response: *mut ffi::sk_enroll_response,
) -> Result<Option<EnrollResponse>, LoadError> {
    if response.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and, per the contract, a valid structure.
    let owned = unsafe { take_enroll_fields(&*response) };
    // SAFETY: the structure came from malloc; its buffers are freed above.
    unsafe { libc::free(response.cast::<c_void>()) };
    owned.map(Some)
}

/// Takes over an `sk_sign_response`: copies it and frees it.
///
/// # Safety
///
/// `response` is NULL or a `malloc`ed structure whose `sig_r` and `sig_s` are
/// NULL or `malloc`ed buffers of their lengths, used by nothing else afterwards.
unsafe fn take_sign_response(
    response: *mut ffi::sk_sign_response,
) -> Result<Option<SignResponse>, LoadError> {
    if response.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and, per the contract, a valid structure.
    let fields = unsafe { &*response };
    // SAFETY: per the contract.
    let sig_r = unsafe { take_buffer(fields.sig_r, fields.sig_r_len) };
    // SAFETY: per the contract.
    let sig_s = unsafe { take_buffer(fields.sig_s, fields.sig_s_len) };
    let (flags, counter) = (fields.flags, fields.counter);
    // SAFETY: the structure came from malloc; nothing refers to it any more.
    unsafe { libc::free(response.cast::<c_void>()) };
    Ok(Some(SignResponse {
        flags,
        counter,
        sig_r: sig_r?,
        sig_s: sig_s?,
    }))
}

/// Takes over the array `sk_load_resident_keys` returned.
///
/// # Safety
///
/// `keys` is NULL or a `malloc`ed array of `count` pointers, each NULL or a
/// `malloc`ed `sk_resident_key` whose `application` is NULL or a `malloc`ed
/// NUL-terminated string and whose buffers follow [`take_enroll_fields`]'s
/// contract, all used by nothing else afterwards.
unsafe fn take_resident_keys(
    keys: *mut *mut ffi::sk_resident_key,
    count: size_t,
) -> Result<Vec<ResidentKey>, LoadError> {
    if keys.is_null() {
        return Ok(Vec::new());
    }
    if count > MAX_RESIDENT_KEYS {
        return Err(LoadError::Malformed("more than 4096 resident keys"));
    }
    let mut taken = Vec::with_capacity(count);
    let mut malformed = None;
    for index in 0..count {
        // SAFETY: index < count, the array's length per the contract.
        let key = unsafe { *keys.add(index) };
        if key.is_null() {
            malformed.get_or_insert(LoadError::Malformed("a NULL resident key"));
            continue;
        }
        // SAFETY: non-NULL, a valid structure per the contract.
        let fields = unsafe { &*key };
        let application = if fields.application.is_null() {
            None
        } else {
            // SAFETY: a NUL-terminated string per the contract.
            let text = unsafe { CStr::from_ptr(fields.application) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: malloc'ed, freed once.
            unsafe { libc::free(fields.application.cast::<c_void>()) };
            Some(text)
        };
        // SAFETY: the embedded key's buffers follow take_enroll_fields' contract.
        let enrolled = unsafe { take_enroll_fields(&fields.key) };
        // SAFETY: NULL or malloc'ed of its length, per the contract.
        let user_id = unsafe { take_buffer(fields.user_id, fields.user_id_len) };
        let (alg, slot, flags) = (fields.alg, fields.slot, fields.flags);
        // SAFETY: the structure came from malloc; its fields are freed above.
        unsafe { libc::free(key.cast::<c_void>()) };
        match (application, enrolled, user_id) {
            (Some(application), Ok(key), Ok(user_id)) => taken.push(ResidentKey {
                alg,
                slot,
                application,
                key,
                flags,
                user_id,
            }),
            (None, _, _) => {
                malformed.get_or_insert(LoadError::Malformed("a resident key without application"));
            }
            (_, Err(err), _) | (_, _, Err(err)) => {
                malformed.get_or_insert(err);
            }
        }
    }
    // SAFETY: the array came from malloc; its elements are freed above.
    unsafe { libc::free(keys.cast::<c_void>()) };
    match malformed {
        Some(err) => Err(err),
        None => Ok(taken),
    }
}

#[cfg(test)]
impl Library {
    /// A "library" made of functions linked into this program (the test
    /// exporter), to test both directions of the boundary in one process.
    fn linked(
        enroll: ffi::sk_enroll_fn,
        sign: ffi::sk_sign_fn,
        load_resident_keys: ffi::sk_load_resident_keys_fn,
    ) -> Self {
        Self {
            path: PathBuf::from("(linked)"),
            version: API_VERSION,
            enroll,
            sign,
            load_resident_keys,
            _one_thread_at_a_time: PhantomData,
            _library: DlLibrary::this(),
        }
    }
}

#[cfg(test)]
// The exported C functions are `pub` as a library's must be; here they live
// in a test module.
#[allow(unreachable_pub)]
mod tests {
    use super::*;
    use crate::{Algorithm, Provider, RESIDENT_KEY, USER_PRESENCE_REQD, USER_VERIFICATION_REQD};

    #[test]
    fn another_api_version_names_the_openssh_releases_this_one_is() {
        // sk-api.h of OpenSSH 10.5 still says SSH_SK_VERSION_MAJOR 0x000a0000.
        let error = LoadError::Version {
            path: "/x/libsk.so".into(),
            found: 0x0009_0000,
        };
        assert_eq!(
            error.to_string(),
            "/x/libsk.so implements sk-api version 0x00090000; this build speaks 0x000a0000 \
             (OpenSSH 8.9 and later, 10.5 included)"
        );
    }

    /// A middleware that echoes its arguments back, to check what crosses.
    #[derive(Default)]
    struct Echo;

    impl Provider for Echo {
        fn enroll(&self, request: &EnrollRequest<'_>) -> Result<EnrollResponse, SkError> {
            if request.pin == Some("0000") {
                return Err(SkError::PinRequired);
            }
            let user = request
                .options
                .iter()
                .find(|o| o.name == "user")
                .map(|o| o.value.as_bytes().to_vec())
                .unwrap_or_default();
            Ok(EnrollResponse {
                flags: request.flags | USER_VERIFICATION_REQD,
                public_key: request.challenge.to_vec(),
                key_handle: request.application.as_bytes().to_vec(),
                signature: Vec::new(),
                attestation_cert: user,
                authdata: vec![u8::try_from(request.algorithm.code()).unwrap_or(9)],
            })
        }

        fn sign(&self, request: &SignRequest<'_>) -> Result<SignResponse, SkError> {
            if request.application == "ssh:panic" {
                panic!("a bug in the middleware");
            }
            Ok(SignResponse {
                flags: request.flags,
                counter: u32::try_from(request.data.len()).unwrap_or(0),
                sig_r: request.key_handle.to_vec(),
                sig_s: request.pin.unwrap_or_default().as_bytes().to_vec(),
            })
        }

        fn load_resident_keys(
            &self,
            pin: Option<&str>,
            _: &[SkOption],
        ) -> Result<Vec<ResidentKey>, SkError> {
            let Some(pin) = pin else {
                return Err(SkError::PinRequired);
            };
            Ok((0..3)
                .map(|slot| ResidentKey {
                    alg: 1,
                    slot,
                    application: format!("ssh:{pin}{slot}"),
                    key: EnrollResponse {
                        public_key: vec![7; 32],
                        key_handle: vec![u8::try_from(slot).unwrap_or(0); 16],
                        ..EnrollResponse::default()
                    },
                    flags: 0,
                    user_id: if slot == 0 { Vec::new() } else { vec![0; 32] },
                })
                .collect())
        }
    }

    crate::export_provider!(Echo);

    fn library() -> Library {
        Library::linked(sk_enroll, sk_sign, sk_load_resident_keys)
    }

    #[test]
    fn the_exported_version_is_the_api_version() {
        assert_eq!(sk_api_version(), 0x000a_0000);
    }

    #[test]
    fn enrol_arguments_and_answers_cross_the_boundary() {
        let library = library();
        let options = [SkOption {
            name: "user".into(),
            value: "alice".into(),
            required: false,
        }];
        let response = library
            .enroll(&EnrollRequest {
                algorithm: Algorithm::Ecdsa,
                challenge: b"challenge",
                application: "ssh:test",
                flags: USER_PRESENCE_REQD | RESIDENT_KEY,
                pin: Some("123456"),
                options: &options,
            })
            .unwrap();
        assert_eq!(
            response.flags,
            USER_PRESENCE_REQD | RESIDENT_KEY | USER_VERIFICATION_REQD
        );
        assert_eq!(response.public_key, b"challenge");
        assert_eq!(response.key_handle, b"ssh:test");
        assert!(response.signature.is_empty());
        assert_eq!(response.attestation_cert, b"alice");
        assert_eq!(response.authdata, [0]);
    }

    #[test]
    fn errors_come_back_as_their_codes() {
        let error = library()
            .enroll(&EnrollRequest {
                algorithm: Algorithm::Ed25519,
                challenge: b"c",
                application: "ssh:",
                flags: 0,
                pin: Some("0000"),
                options: &[],
            })
            .unwrap_err();
        assert!(matches!(error, LoadError::Middleware(SkError::PinRequired)));
    }

    #[test]
    fn signatures_cross_with_pin_flags_and_counter() {
        let response = library()
            .sign(&SignRequest {
                algorithm: Algorithm::Ed25519,
                data: &[1; 300],
                application: "ssh:",
                key_handle: &[5; 64],
                flags: USER_PRESENCE_REQD,
                pin: Some("987654"),
                options: &[],
            })
            .unwrap();
        assert_eq!(response.flags, USER_PRESENCE_REQD);
        assert_eq!(response.counter, 300);
        assert_eq!(response.sig_r, [5; 64]);
        assert_eq!(response.sig_s, b"987654");
        // An empty PIN is no PIN: it never reaches the provider.
        let response = library()
            .sign(&SignRequest {
                algorithm: Algorithm::Ed25519,
                data: b"",
                application: "ssh:",
                key_handle: b"",
                flags: 0,
                pin: Some(""),
                options: &[],
            })
            .unwrap();
        assert!(response.sig_r.is_empty() && response.sig_s.is_empty());
    }

    #[test]
    fn a_panic_in_the_provider_is_a_general_error_not_an_unwind_into_c() {
        let error = library()
            .sign(&SignRequest {
                algorithm: Algorithm::Ecdsa,
                data: b"x",
                application: "ssh:panic",
                key_handle: b"h",
                flags: 0,
                pin: None,
                options: &[],
            })
            .unwrap_err();
        assert!(matches!(error, LoadError::Middleware(SkError::General)));
    }

    #[test]
    fn resident_keys_cross_and_are_freed() {
        let library = library();
        let missing = library.load_resident_keys(None, &[]).unwrap_err();
        assert!(matches!(
            missing,
            LoadError::Middleware(SkError::PinRequired)
        ));
        let keys = library.load_resident_keys(Some("42"), &[]).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[2].application, "ssh:422");
        assert_eq!(keys[2].slot, 2);
        assert_eq!(keys[2].key.key_handle, [2; 16]);
        assert_eq!(keys[1].user_id, [0; 32]);
        assert!(keys[0].user_id.is_empty());
    }

    #[test]
    fn strings_with_nul_bytes_are_refused_before_the_call() {
        let error = library()
            .sign(&SignRequest {
                algorithm: Algorithm::Ed25519,
                data: b"x",
                application: "ssh:\0evil",
                key_handle: b"h",
                flags: 0,
                pin: None,
                options: &[],
            })
            .unwrap_err();
        assert!(matches!(error, LoadError::Argument("the application")));
    }

    #[test]
    fn a_missing_library_says_so() {
        let error = Library::open("/nonexistent/libsk.so").unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/libsk.so"),
            "{error}"
        );
    }

    #[test]
    fn a_library_without_the_api_is_not_a_middleware() {
        // libc is loaded in every process and has none of the four functions.
        let Some(libc_path) = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists()) else {
            return;
        };
        let error = Library::open(libc_path).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("is not an OpenSSH security-key middleware"),
            "{error}"
        );
    }
}
