//! The inode table: numbers for nodes, stable for the life of the mount.

use std::collections::HashMap;

use super::node::Node;

pub const ROOT_INO: u64 = 1;

/// Numbers nodes. A node keeps its number for the life of the mount, so the kernel's
/// cached entries always mean the same thing.
pub struct InodeTable {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Node>,
    next: u64,
}

impl Default for InodeTable {
    fn default() -> Self {
        let mut table = InodeTable {
            by_node: HashMap::new(),
            by_ino: HashMap::new(),
            next: ROOT_INO,
        };
        table.ino_of(&Node::root());
        table
    }
}

impl InodeTable {
    pub fn ino_of(&mut self, node: &Node) -> u64 {
        if let Some(&ino) = self.by_node.get(node) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_node.insert(node.clone(), ino);
        self.by_ino.insert(ino, node.clone());
        ino
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.by_ino.get(&ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inodes_are_stable() {
        let mut t = InodeTable::default();
        assert_eq!(t.ino_of(&Node::root()), ROOT_INO);
        let n = Node::Dir("x".into());
        let i = t.ino_of(&n);
        assert_eq!(t.ino_of(&n), i);
        assert_eq!(t.node(i), Some(&n));
        assert_ne!(i, ROOT_INO);
    }
}
