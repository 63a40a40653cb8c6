//! Partitions moved while the agent was stopped. The slot monitor reports a partition attached
//! with rows, detached or dropped while the agent runs; one moved while it was stopped would go
//! unnoticed, so each attempt records the leaf partitions of every partitioned table it
//! streams in that table's Iceberg state, and the first attempt of an agent's run compares
//! them with what the last run recorded.

use std::collections::HashMap;

use super::Applier;
use crate::pipeline::PipelineError;
use crate::sink::iceberg::table::{update_properties, PropertyChanges};

/// Table property: the leaf partitions (OIDs, ascending, comma-separated) of a partitioned
/// source table when an attempt last started.
pub const PARTITIONS_PROPERTY: &str = "philotes.partitions";

/// How a partitioned table's leaf partitions differ from those recorded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartitionChange {
    /// Leaf partitions not recorded (OID, quoted name).
    pub joined: Vec<(u32, String)>,
    /// Recorded leaf partitions gone from the table (OIDs).
    pub left: Vec<u32>,
}

impl Applier {
    /// Record `leaves` (partitioned `source`'s leaf partitions now) in its Iceberg state;
    /// how they differ from the last record (`None`: no Iceberg table yet, nothing recorded
    /// before, no difference, or `report` off: a table copied in this attempt holds its
    /// partitions as they are now).
    pub(in crate::pipeline) async fn partitions_since(
        &self,
        source: &str,
        leaves: &[(u32, String)],
        report: bool,
    ) -> Result<Option<PartitionChange>, PipelineError> {
        let Some(props) = self.state_of(source).await? else {
            return Ok(None);
        };
        let now = leaves
            .iter()
            .map(|(o, _)| o.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let recorded = props.get(PARTITIONS_PROPERTY);
        if recorded == Some(&now) {
            return Ok(None);
        }
        update_properties(
            &self.committer,
            &self.state_table(source),
            PropertyChanges {
                set: HashMap::from([(PARTITIONS_PROPERTY.to_string(), now)]),
                remove: Vec::new(),
            },
            &self.secrets,
        )
        .await?;
        let copied = self
            .tables
            .iter()
            .any(|t| t.source_name == source && t.copied);
        Ok(match recorded {
            Some(r) if report && !copied => Some(compare(r, leaves)),
            _ => None,
        })
    }
}

/// `leaves` against the recorded OIDs `recorded`.
fn compare(recorded: &str, leaves: &[(u32, String)]) -> PartitionChange {
    let was: Vec<u32> = recorded
        .split(',')
        .filter_map(|o| o.trim().parse().ok())
        .collect();
    PartitionChange {
        joined: leaves
            .iter()
            .filter(|(o, _)| !was.contains(o))
            .cloned()
            .collect(),
        left: was
            .into_iter()
            .filter(|o| !leaves.iter().any(|(l, _)| l == o))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_joined_and_left_are_told_apart() {
        let now = [(11, "s.p1".to_string()), (14, "s.p4".to_string())];
        assert_eq!(
            compare("11,12,13", &now),
            PartitionChange {
                joined: vec![(14, "s.p4".into())],
                left: vec![12, 13],
            }
        );
        assert_eq!(compare("11,14", &now), PartitionChange::default());
        // A table with no partition left is recorded as an empty list.
        assert_eq!(
            compare("", &now).joined.len(),
            2,
            "every partition joined an empty record"
        );
    }
}
