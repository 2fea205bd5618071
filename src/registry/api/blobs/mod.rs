//! Blob reads: the GETs (get.rs), the paced body they hand out (body.rs), and a stream's
//! GET on a connection of its own (socket.rs).

mod body;
mod get;
mod socket;

pub use body::BlobBody;
