pub mod known_repos;
pub mod referrers;
pub mod registry_view;
