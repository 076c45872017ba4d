//! Passing a file descriptor with a few bytes over a unix socket (`SCM_RIGHTS`): a
//! child's recall channel in its preamble, a worker's arena on its recall channel, a
//! pipe end from a hub. One message carries at most one descriptor.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Sends `bytes`, with `fd` attached if given; returns how many bytes went (a
/// non-blocking socket may take fewer, or fail with `WouldBlock`). The descriptor goes
/// with the first byte.
pub(crate) fn send_with_fd(
    sock: impl AsFd,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !anc.push(SendAncillaryMessage::ScmRights(&fds)) {
            unreachable!("the buffer has room for one descriptor");
        }
    }
    loop {
        match rustix::net::sendmsg(&sock, &[IoSlice::new(bytes)], &mut anc, SendFlags::NOSIGNAL) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(Into::into),
        }
    }
}

/// Receives up to `buf.len()` bytes and the descriptor that came with them, if any
/// (close-on-exec). Zero bytes: the peer closed the socket.
pub(crate) fn recv_with_fd(
    sock: impl AsFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            &sock,
            &mut [IoSliceMut::new(buf)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fd = None;
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            // One is expected; any others are closed as they drop.
            for f in fds {
                fd = fd.or(Some(f));
            }
        }
    }
    Ok((got.bytes, fd))
}
