//! Page-aligned, zero-initialised heap buffers: the only buffer type the
//! engines read into, so that the same buffer serves buffered and O_DIRECT I/O.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: enough for O_DIRECT on any logical
/// block size up to 4 KiB.
pub const ALIGNMENT: usize = 4096;

/// A zero-initialised byte buffer whose start is aligned to [`ALIGNMENT`].
///
/// The memory never moves while the buffer lives, so an engine may hand its
/// pointer to the kernel for as long as it owns the buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); nothing
// else holds the pointer except an engine that owns the buffer meanwhile.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `as_slice`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zero bytes (a zero-length buffer allocates nothing).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, ALIGNMENT).expect("buffer length overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes, or dangling with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: allocated in `zeroed` with this very layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [1, 511, 4096, 65536 + 3] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_mut_ptr() as usize % ALIGNMENT, 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
            buf.as_mut_slice()[len - 1] = 7;
            assert_eq!(buf.as_slice()[len - 1], 7);
        }
        assert!(AlignedBuf::zeroed(0).is_empty());
    }

    #[test]
    fn converts_into_bytes_without_copying() {
        let mut buf = AlignedBuf::zeroed(8192);
        buf.as_mut_slice()[100] = 42;
        let ptr = buf.as_mut_ptr() as usize;
        let bytes = bytes::Bytes::from_owner(buf);
        assert_eq!(bytes.as_ptr() as usize, ptr);
        assert_eq!(bytes[100], 42);
    }
}
