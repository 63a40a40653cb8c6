//! Copying a table again: asked for by an operator, or because the source table was dropped
//! and created again (another relation, by OID, under the name its Iceberg tables hold).
//!
//! The request is first recorded in the table's state (`philotes.snapshot = requested`, the
//! copy's progress removed) so that a crash does not forget it; the copy then starts with a
//! truncate marker (`T`, at the copy's point, before its `R` rows): the changelog keeps its
//! history, folded from the latest `T` on; a keyed mirror keeps its rows while the copy
//! replaces them (see `Replacing` in the mirror writer), one without a key empties and fills
//! again.

use std::collections::HashMap;

use super::{Applier, SOURCE_OID_PROPERTY};
use crate::model::iceberg_table_name;
use crate::pipeline::PipelineError;
use crate::sink::iceberg::schema::{
    CHANGELOG_SUFFIX, SNAPSHOT_PROGRESS_PROPERTY, SNAPSHOT_PROPERTY, SNAPSHOT_REQUESTED,
};
use crate::sink::iceberg::table::{
    properties_of, update_properties, PropertyChanges, SOURCE_TABLE_PROPERTY,
};
use crate::telemetry::events::{CopyReason, TableCopiedAgain};

impl Applier {
    /// The Iceberg table holding `source`'s copy state: its changelog (its mirror in
    /// `mode = "mirror"`).
    pub(super) fn state_table(&self, source: &str) -> iceberg::TableIdent {
        let (schema, name) = source.split_once('.').unwrap_or(("public", source));
        let table = iceberg_table_name(schema, name);
        let mode = self.cfg.mode_for(source);
        let name = if mode.mirror() && mode.changelog() {
            format!("{table}{CHANGELOG_SUFFIX}")
        } else {
            table
        };
        iceberg::TableIdent::new(iceberg::NamespaceIdent::new(self.namespace.clone()), name)
    }

    /// The properties of `source`'s state table, if it exists and holds `source` (another
    /// source table mapping to the same name is refused when the table is opened).
    pub(super) async fn state_of(
        &self,
        source: &str,
    ) -> Result<Option<HashMap<String, String>>, PipelineError> {
        let catalog = self.committer.catalog().clone();
        let ident = self.state_table(source);
        let props = properties_of(catalog.as_ref(), &ident, &self.secrets).await?;
        Ok(props.filter(|p| {
            p.get(SOURCE_TABLE_PROPERTY)
                .is_none_or(|holds| holds == source)
        }))
    }

    /// Whether `source` (as configured) has Iceberg tables: it was copied or streamed.
    pub(in crate::pipeline) async fn has_tables(
        &self,
        source: &str,
    ) -> Result<bool, PipelineError> {
        Ok(self.state_of(source).await?.is_some())
    }

    /// Before an attempt copies or streams `source` (as configured; its relation is `oid`
    /// now): record a request to copy it again, or find that it was created again since its
    /// Iceberg tables last saw it. Returns whether a copy is due (asked, or one under way).
    pub(in crate::pipeline) async fn copy_again(
        &mut self,
        source: &str,
        oid: Option<u32>,
        asked: Option<CopyReason>,
    ) -> Result<bool, PipelineError> {
        let ident = self.state_table(source);
        // A table without Iceberg tables yet gets its first copy (or none) the usual way.
        let Some(props) = self.state_of(source).await? else {
            return Ok(false);
        };
        let state = props.get(SNAPSHOT_PROPERTY).map(String::as_str);
        let recorded = props.get(SOURCE_OID_PROPERTY);
        let now = oid.map(|o| o.to_string());
        let recreated = matches!((recorded, &now), (Some(r), Some(n)) if r != n);
        let reason = asked.or(recreated.then_some(CopyReason::Recreated));
        let mut set = HashMap::new();
        let mut remove = Vec::new();
        if let Some(n) = &now {
            if recorded != Some(n) {
                set.insert(SOURCE_OID_PROPERTY.to_string(), n.clone());
            }
        }
        let pending = match (reason, state) {
            (Some(_), Some(SNAPSHOT_REQUESTED)) | (None, Some(SNAPSHOT_REQUESTED | "partial")) => {
                true
            }
            (Some(_), _) => {
                set.insert(
                    SNAPSHOT_PROPERTY.to_string(),
                    SNAPSHOT_REQUESTED.to_string(),
                );
                remove.push(SNAPSHOT_PROGRESS_PROPERTY.to_string());
                true
            }
            (None, _) => false,
        };
        if !set.is_empty() || !remove.is_empty() {
            update_properties(
                &self.committer,
                &ident,
                PropertyChanges { set, remove },
                &self.secrets,
            )
            .await?;
        }
        if let Some(reason) = reason {
            TableCopiedAgain {
                table: source,
                reason,
            }
            .emit();
        }
        Ok(pending)
    }

    /// A mirror opened (or keyed again) with rows that have no value in its key: no change
    /// can reach them, so the table is copied again, once per agent process (`healed`), unless
    /// a copy is already due. Ends the attempt with the table marked.
    pub(in crate::pipeline) async fn copy_if_rows_lack_a_key(
        &mut self,
        idx: usize,
    ) -> Result<(), PipelineError> {
        let t = &self.tables[idx];
        let unkeyed =
            t.sink.rows_without_key() + t.mirror.as_ref().map_or(0, |m| m.rows_without_key());
        let state = t.sink.property(SNAPSHOT_PROPERTY);
        if unkeyed == 0
            || self.healed.contains(&t.source_name)
            || matches!(state.as_deref(), Some(SNAPSHOT_REQUESTED | "partial"))
        {
            return Ok(());
        }
        let source = t.source_name.clone();
        update_properties(
            &self.committer,
            &self.state_table(&source),
            PropertyChanges {
                set: HashMap::from([(
                    SNAPSHOT_PROPERTY.to_string(),
                    SNAPSHOT_REQUESTED.to_string(),
                )]),
                remove: vec![SNAPSHOT_PROGRESS_PROPERTY.to_string()],
            },
            &self.secrets,
        )
        .await?;
        TableCopiedAgain {
            table: &source,
            reason: CopyReason::RowsWithoutKey,
        }
        .emit();
        Err(PipelineError::RowsWithoutKey(source))
    }
}
