//! What the registry holds, as regfs knows it: lists, objects, what tags reach,
//! referrers; memos with `--tag-ttl` (registry_view.rs composes them).

mod bounds;
mod known_repos;
mod lists;
mod objects;
mod reachable;
mod referrers;
mod registry_view;

pub use bounds::bounded;
pub use registry_view::RegistryView;
