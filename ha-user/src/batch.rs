//! Whole-map dumps with `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+): one syscall
//! per map instead of two per entry, so the fuzzer can compare every map
//! after every packet, and the agent sweeps from a consistent walk (a
//! `get_next_key` walk starts over whenever the key it stands on is deleted).
//! Writes with `BPF_MAP_UPDATE_BATCH`: a Maglev table (65,537 entries by
//! default) in one syscall instead of one per entry, which took 0.4 s in a
//! debug build and delayed every health change's effect by as much.
//! aya 0.14 does not expose batch operations, so this is
//! the raw syscall (include/uapi/linux/bpf.h, `struct { ... } batch`).

use std::{io, os::fd::AsRawFd};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The (key, value) pairs of a map, as raw bytes, at most `limit` of them
/// (an array's come in index order). `value_size` is the size the syscall
/// uses: for a per-CPU map, the value rounded up to 8 bytes, times the
/// number of possible CPUs.
///
/// # Errors
/// The syscall's error, other than the `ENOENT` that ends a dump.
pub fn dump(
    fd: impl AsRawFd,
    key_size: usize,
    value_size: usize,
    limit: usize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let chunk = limit.clamp(1, 4096);
    let mut keys = vec![0u8; key_size * chunk];
    let mut values = vec![0u8; value_size * chunk];
    // The token is a bucket index for hash maps and a key for arrays: 16 bytes hold either.
    let mut token = [0u8; 16];
    let mut next = [0u8; 16];
    let mut first = true;
    let mut out = Vec::new();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at buffers sized for `count` entries and a 16-byte token.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let done = if rc < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOENT) {
                return Err(error);
            }
            true
        } else {
            false
        };
        for i in 0..attr.count as usize {
            out.push((
                keys[i * key_size..(i + 1) * key_size].to_vec(),
                values[i * value_size..(i + 1) * value_size].to_vec(),
            ));
        }
        if done || out.len() >= limit {
            out.truncate(limit);
            return Ok(out);
        }
        token = next;
        first = false;
    }
}

/// Writes `values[i]` at index `first + i` of the `u32` array map `fd`,
/// `BPF_MAP_UPDATE_BATCH` chunks of up to 65,536 entries (each entry is
/// written atomically; the whole is not: callers write an idle region).
///
/// # Errors
/// The syscall's error; `EINVAL` or `ENOTSUPP` where the kernel has no batch
/// update for arrays (before 5.6), and the caller falls back to one update
/// per entry.
pub fn update_u32_array(fd: impl AsRawFd, first: u32, values: &[u32]) -> io::Result<()> {
    const CHUNK: usize = 65_536;
    for (n, chunk) in values.chunks(CHUNK).enumerate() {
        let base = first + (n * CHUNK) as u32;
        let keys: Vec<u32> = (0..chunk.len() as u32).map(|i| base + i).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at `count` keys and values of the map's sizes (4 bytes each).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if attr.count as usize != chunk.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} entries",
                attr.count,
                chunk.len()
            )));
        }
    }
    Ok(())
}

/// A `#[repr(C)]` plain-data value from its bytes.
///
/// # Panics
/// If `bytes` is shorter than `T` (a caller bug: sizes come from the types).
pub fn read<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= std::mem::size_of::<T>());
    // SAFETY: long enough; T is plain data (ha-common's map types), any bytes are valid.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) }
}

/// One CPU's value out of a per-CPU map's value (each rounded up to 8 bytes).
pub fn per_cpu<T: Copy>(bytes: &[u8], cpu: usize) -> T {
    let stride = std::mem::size_of::<T>().div_ceil(8) * 8;
    read(&bytes[cpu * stride..])
}

/// The syscall value size of a per-CPU map of `T`.
pub fn per_cpu_size<T>(cpus: usize) -> usize {
    std::mem::size_of::<T>().div_ceil(8) * 8 * cpus
}
