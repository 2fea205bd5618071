pub mod fetch;
pub mod link_speed;
pub mod mirror_whole;
pub mod readahead;
pub mod reads;
pub mod stream;
pub mod verify;
