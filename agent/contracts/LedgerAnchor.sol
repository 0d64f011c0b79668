// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// Anchors of hms-edge integrity-log checkpoints. Only a Merkle root of keyed hashes, a tree size
/// and a log id (SHA-256 of the log's origin line) ever go on chain: never patient data.
contract LedgerAnchor {
    /// One anchored checkpoint. `submitter` is the box's anchoring account.
    event Anchored(bytes32 indexed logId, uint64 treeSize, bytes32 root, address indexed submitter);

    function anchor(bytes32 root, uint64 treeSize, bytes32 logId) external {
        emit Anchored(logId, treeSize, root, msg.sender);
    }
}
