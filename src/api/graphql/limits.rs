//! What one GraphQL operation may cost, checked before async-graphql
//! walks it.
//!
//! Why: async-graphql's validation rules and its depth and complexity
//! visitors expand fragment spreads inline, so a document whose fragments
//! each spread the next one twice costs 2^n to validate while its text
//! grows by n; even its recursion-depth check does. Here, before any of
//! them, the document's *expanded* size and depth are computed
//! once per fragment (memoised over the fragment graph), which is linear in
//! the text, and a document over the bounds is refused before anything
//! expands it. What then reaches async-graphql is bounded in size.
//!
//! Depth is counted apart for introspection (`__schema`, `__type`): the
//! standard introspection query of graphql-js and GraphiQL nests `ofType`
//! nine levels deep, deeper than any data query needs.
//!
//! Every query also runs under a deadline ([`OPERATION_DEADLINE`]);
//! mutations run until their own timeouts (an exec's, a spawn's), and
//! subscriptions are long-lived by design and bounded by their connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextPrepareRequest,
};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Pos, Request, Response, ServerError, ServerResult};

use crate::service::Error;

/// Deepest data selection accepted: deep enough for sandbox -> executions
/// -> sandbox round trips, shallow enough to refuse abusive nesting.
pub const MAX_DEPTH: usize = 10;
/// Deepest introspection selection accepted (graphql-js's standard query
/// needs 14).
pub const MAX_INTROSPECTION_DEPTH: usize = 20;
/// Deepest nesting the parser accepts (selection sets and fields both
/// count), which bounds its recursion.
pub const MAX_PARSE_NESTING: usize = 64;
/// Most fields (`__typename` included), arguments, directives and
/// variables a document may hold once every fragment spread is expanded.
pub const MAX_SELECTIONS: u64 = 2_000;
/// Most fragment definitions in one document.
pub const MAX_FRAGMENTS: usize = 100;
/// How long one query may run.
pub const OPERATION_DEADLINE: Duration = Duration::from_secs(30);

/// The size of a selection set once expanded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Shape {
    /// Fields selected, `__typename` included (saturating).
    selections: u64,
    /// Deepest data field.
    depth: usize,
    /// Deepest field under an introspection root.
    introspection_depth: usize,
}

impl Shape {
    fn merge(&mut self, other: Shape) {
        self.selections = self.selections.saturating_add(other.selections);
        self.depth = self.depth.max(other.depth);
        self.introspection_depth = self.introspection_depth.max(other.introspection_depth);
    }
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("the query defines {0} fragments; at most {MAX_FRAGMENTS} are allowed")]
    TooManyFragments(usize),
    #[error(
        "the query selects {0} fields, arguments and directives once its fragments are expanded; at most {MAX_SELECTIONS} are allowed"
    )]
    TooManySelections(u64),
    #[error("the query is nested {0} levels deep; at most {MAX_DEPTH} are allowed")]
    TooDeep(usize),
    #[error(
        "the introspection query is nested {0} levels deep; at most {MAX_INTROSPECTION_DEPTH} are allowed"
    )]
    IntrospectionTooDeep(usize),
    #[error("fragment {0} spreads itself")]
    FragmentCycle(String),
    #[error("unknown fragment {0}")]
    UnknownFragment(String),
}

/// Memoised walk over a document's fragment graph.
struct Walk<'a> {
    doc: &'a ExecutableDocument,
    /// Per fragment and whether it is spread under introspection: `None`
    /// while it is being walked (a cycle if met again), its shape
    /// (relative to its spread point) once done.
    fragments: HashMap<(&'a str, bool), Option<Shape>>,
}

impl<'a> Walk<'a> {
    /// The shape of `set` whose fields sit at depth `1`, and `in_introspection`
    /// whether an introspection root is above it. Depths are relative, so a
    /// fragment's shape is the same wherever it is spread, except for which
    /// depth counter it feeds: it is memoised per context.
    fn set(&mut self, set: &'a SelectionSet, in_introspection: bool) -> Result<Shape, LimitError> {
        let mut shape = Shape::default();
        for item in &set.items {
            match &item.node {
                Selection::Field(field) => {
                    let name = field.node.name.node.as_str();
                    let introspection =
                        in_introspection || (name.starts_with("__") && name != "__typename");
                    let child = self.set(&field.node.selection_set.node, introspection)?;
                    // Arguments and directives cost too: validation compares
                    // them pairwise between fields of one response name.
                    let cost = 1 + field.node.arguments.len() + field.node.directives.len();
                    let mut own = Shape {
                        selections: child.selections.saturating_add(cost as u64),
                        ..Shape::default()
                    };
                    if introspection {
                        own.introspection_depth = 1 + child.introspection_depth.max(child.depth);
                    } else {
                        own.depth = 1 + child.depth;
                        own.introspection_depth = child.introspection_depth;
                        if child.introspection_depth > 0 {
                            own.introspection_depth += 1;
                        }
                    }
                    shape.merge(own);
                }
                Selection::InlineFragment(inline) => {
                    shape.selections = shape
                        .selections
                        .saturating_add(inline.node.directives.len() as u64);
                    shape.merge(self.set(&inline.node.selection_set.node, in_introspection)?);
                }
                Selection::FragmentSpread(spread) => {
                    shape.selections = shape
                        .selections
                        .saturating_add(spread.node.directives.len() as u64);
                    let name = spread.node.fragment_name.node.as_str();
                    shape.merge(self.fragment(name, in_introspection)?);
                }
            }
            if shape.selections > MAX_SELECTIONS {
                return Err(LimitError::TooManySelections(shape.selections));
            }
        }
        Ok(shape)
    }

    fn fragment(&mut self, name: &'a str, in_introspection: bool) -> Result<Shape, LimitError> {
        match self.fragments.get(&(name, in_introspection)) {
            Some(Some(shape)) => return Ok(*shape),
            Some(None) => return Err(LimitError::FragmentCycle(name.to_string())),
            None => {}
        }
        let doc = self.doc;
        let Some((key, definition)) = doc.fragments.get_key_value(name) else {
            return Err(LimitError::UnknownFragment(name.to_string()));
        };
        let key = key.as_str();
        self.fragments.insert((key, in_introspection), None);
        let shape = self.set(&definition.node.selection_set.node, in_introspection)?;
        self.fragments.insert((key, in_introspection), Some(shape));
        Ok(shape)
    }
}

/// Checks a parsed document against the bounds above, in time linear in
/// its text.
pub fn check(doc: &ExecutableDocument) -> Result<(), LimitError> {
    if doc.fragments.len() > MAX_FRAGMENTS {
        return Err(LimitError::TooManyFragments(doc.fragments.len()));
    }
    let mut walk = Walk {
        doc,
        fragments: HashMap::with_capacity(doc.fragments.len()),
    };
    let mut total = Shape::default();
    for (_, operation) in doc.operations.iter() {
        let own = operation.node.variable_definitions.len() + operation.node.directives.len();
        total.selections = total.selections.saturating_add(own as u64);
        total.merge(walk.set(&operation.node.selection_set.node, false)?);
        if total.selections > MAX_SELECTIONS {
            return Err(LimitError::TooManySelections(total.selections));
        }
    }
    // Fragments no operation spreads are refused by validation; they are
    // still bounded here so that validation never expands a large one.
    let names: Vec<&str> = doc.fragments.keys().map(|n| n.as_str()).collect();
    for name in names {
        if !walk.fragments.contains_key(&(name, false))
            && !walk.fragments.contains_key(&(name, true))
        {
            let shape = walk.fragment(name, false)?;
            total.merge(shape);
            if total.selections > MAX_SELECTIONS {
                return Err(LimitError::TooManySelections(total.selections));
            }
        }
    }
    if total.depth > MAX_DEPTH {
        return Err(LimitError::TooDeep(total.depth));
    }
    if total.introspection_depth > MAX_INTROSPECTION_DEPTH {
        return Err(LimitError::IntrospectionTooDeep(total.introspection_depth));
    }
    Ok(())
}

fn refusal(e: Error) -> ServerError {
    super::errors::gql_error(e).into_server_error(Pos::default())
}

/// The extension: shape check before async-graphql's own, deadline
/// around each query.
pub struct QueryLimits;

impl ExtensionFactory for QueryLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(QueryLimitsExtension::default())
    }
}

/// One per request.
#[derive(Default)]
struct QueryLimitsExtension {
    /// Whether the document holds only queries: mutations are not cut off
    /// by the deadline (an exec or a spawn would go on while its client
    /// was told it failed); they are bounded by their own timeouts.
    only_queries: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Extension for QueryLimitsExtension {
    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        if !self.only_queries.load(std::sync::atomic::Ordering::Relaxed) {
            return next.run(ctx, operation_name).await;
        }
        match tokio::time::timeout(OPERATION_DEADLINE, next.run(ctx, operation_name)).await {
            Ok(response) => response,
            Err(_) => Response::from_errors(vec![refusal(Error::Timeout(format!(
                "the query did not finish within {} s",
                OPERATION_DEADLINE.as_secs()
            )))]),
        }
    }

    /// Parses the document here (async-graphql keeps it and does not parse
    /// again) and checks it before anything of async-graphql's walks it:
    /// even its recursion-depth check expands fragments.
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        let doc = request.parsed_query()?;
        check(doc).map_err(|e| refusal(Error::BadRequest(e.to_string())))?;
        let only_queries = doc
            .operations
            .iter()
            .all(|(_, op)| op.node.ty == async_graphql::parser::types::OperationType::Query);
        self.only_queries
            .store(only_queries, std::sync::atomic::Ordering::Relaxed);
        next.run(ctx, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(query: &str) -> Result<(), LimitError> {
        check(&async_graphql::parser::parse_query(query).expect("parses"))
    }

    /// `n` fragments, each spreading the next twice: 2^n fields expanded.
    fn fan_out(n: usize) -> String {
        let mut q = String::from("query { sandboxes { ...S0 } }\n");
        for i in 0..n {
            q.push_str(&format!(
                "fragment S{i} on Sandbox {{ a{i}: id ...S{} b{i}: id ...S{} }}\n",
                i + 1,
                i + 1
            ));
        }
        q.push_str(&format!("fragment S{n} on Sandbox {{ __typename }}\n"));
        q
    }

    #[test]
    fn fragment_fan_out_is_refused_without_expanding_it() {
        assert!(matches!(
            shape(&fan_out(60)),
            Err(LimitError::TooManySelections(_))
        ));
        // A small fan-out within the bounds passes.
        assert_eq!(shape(&fan_out(5)), Ok(()));
    }

    #[test]
    fn fan_out_through_both_depth_contexts_stays_linear() {
        // Each fragment spreads the next once as data and once under
        // introspection: memoised per context, this is 2n walks, not 2^n.
        let n = 80;
        let mut q = String::from("{ ...S0 }\n");
        for i in 0..n {
            q.push_str(&format!(
                "fragment S{i} on Query {{ a{i}: __typename ...S{} t{i}: __type(name: \"Query\") {{ ...S{} }} }}\n",
                i + 1,
                i + 1
            ));
        }
        q.push_str(&format!("fragment S{n} on Query {{ __typename }}\n"));
        assert!(matches!(shape(&q), Err(LimitError::TooManySelections(_))));
    }

    #[test]
    fn arguments_and_directives_count() {
        let args = "x: 1 ".repeat(MAX_SELECTIONS as usize);
        let q = format!("{{ a: __typename({args}) a: __typename({args}) }}");
        assert!(matches!(shape(&q), Err(LimitError::TooManySelections(_))));
        let dirs = "@skip(if: false) ".repeat(MAX_SELECTIONS as usize + 1);
        assert!(matches!(
            shape(&format!("{{ __typename {dirs} }}")),
            Err(LimitError::TooManySelections(_))
        ));
    }

    #[test]
    fn typename_counts_as_a_selection() {
        let many = format!(
            "{{ {} }}",
            "__typename ".repeat(MAX_SELECTIONS as usize + 1)
        );
        assert!(matches!(
            shape(&many),
            Err(LimitError::TooManySelections(_))
        ));
    }

    #[test]
    fn fragments_are_bounded_in_number() {
        let mut q = String::from("{ __typename }\n");
        for i in 0..=MAX_FRAGMENTS {
            q.push_str(&format!("fragment F{i} on Query {{ __typename }}\n"));
        }
        assert_eq!(
            shape(&q),
            Err(LimitError::TooManyFragments(MAX_FRAGMENTS + 1))
        );
    }

    #[test]
    fn cycles_and_unknown_fragments_are_refused() {
        assert!(matches!(
            shape("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }"),
            Err(LimitError::FragmentCycle(_))
        ));
        assert_eq!(
            shape("{ ...Missing }"),
            Err(LimitError::UnknownFragment("Missing".into()))
        );
    }

    #[test]
    fn data_depth_is_bounded_through_fragments() {
        let deep = |n: usize| {
            let mut q = String::from("{ ...L0 }\n");
            for i in 0..n {
                q.push_str(&format!(
                    "fragment L{i} on Sandbox {{ f{i}: sandbox {{ ...L{} }} }}\n",
                    i + 1
                ));
            }
            q.push_str(&format!("fragment L{n} on Sandbox {{ id }}\n"));
            q
        };
        assert_eq!(shape(&deep(MAX_DEPTH - 1)), Ok(()));
        assert_eq!(
            shape(&deep(MAX_DEPTH)),
            Err(LimitError::TooDeep(MAX_DEPTH + 1))
        );
    }

    #[test]
    fn standard_introspection_passes_and_deeper_is_refused() {
        let of_type = |levels: usize| {
            let mut s = String::from("kind name");
            for _ in 0..levels {
                s = format!("kind name ofType {{ {s} }}");
            }
            s
        };
        let query = |levels: usize| {
            format!(
                "query IntrospectionQuery {{ __schema {{ queryType {{ name }} types {{ ...FullType }} }} }}
                 fragment FullType on __Type {{ kind name description
                   fields(includeDeprecated: true) {{ name description args {{ name type {{ ...TypeRef }} }} type {{ ...TypeRef }} }}
                   inputFields {{ name type {{ ...TypeRef }} }} interfaces {{ ...TypeRef }}
                   enumValues(includeDeprecated: true) {{ name }} possibleTypes {{ ...TypeRef }} }}
                 fragment TypeRef on __Type {{ {} }}",
                of_type(levels)
            )
        };
        assert_eq!(shape(&query(9)), Ok(()));
        assert!(matches!(
            shape(&query(30)),
            Err(LimitError::IntrospectionTooDeep(_))
        ));
    }
}
