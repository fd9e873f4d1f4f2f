//! An upper bound on what evaluating an expression costs, computed before it runs from the
//! sizes of the values it reads, so that one expression cannot stall the executor's engine.
//!
//! CEL has no loops but comprehensions (`map`, `filter`, `all`, `exists`, `exists_one`), and
//! [`MAX_COMPREHENSION_DEPTH`](dagmesh_proto::limits::MAX_COMPREHENSION_DEPTH) bounds their
//! nesting, so the work is a polynomial in the sizes of the bound values. The estimate walks the
//! expression once, tracking for each subexpression an upper bound on its value's [`Shape`] and
//! on the work spent so far. Paths into the bound data (`fetch.images`, `inputs.rooms[0]`) are
//! measured on the data itself, so that `fetch.images.map(i, i + '.png')` is charged for the
//! images there are and the size of the largest one, not for everything `fetch` returned.
//!
//! Units are weights: one per JSON node plus one per string byte. The estimate is conservative:
//! a comprehension is charged as if every element were as heavy as the heaviest one.
//!
//! What it relies on: comprehensions only come from the standard macros (CEL source cannot write
//! one directly), whose accumulators grow by one appended element or stay a bool or an int, and
//! which cel evaluates without copying the accumulator; no function of the standard library
//! returns more than its arguments plus a few bytes (`string(1.5)`), as no extension library is
//! registered.

use std::collections::HashMap;

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use serde_json::{Map, Value as Json};

/// Upper bounds on a value: its weight, how many elements (list items, map entries, string
/// bytes) it has, and the weight of its heaviest element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Shape {
    pub weight: u64,
    pub count: u64,
    pub elem: u64,
}

impl Shape {
    /// A value known only by its weight: it could be a list of that many elements, or one
    /// element that heavy.
    fn opaque(weight: u64) -> Shape {
        Shape {
            weight,
            count: weight,
            elem: weight,
        }
    }

    fn join(self, other: Shape) -> Shape {
        Shape {
            weight: self.weight.max(other.weight),
            count: self.count.max(other.count),
            elem: self.elem.max(other.elem),
        }
    }
}

/// What the estimate knows about a value: where it is in the bound data, or bounds only.
#[derive(Clone, Copy)]
enum Abs<'j> {
    Object(&'j Map<String, Json>),
    Value(&'j Json),
    Bound(Shape),
}

/// A string of `bytes` bytes, or a literal of that length.
fn text(bytes: usize) -> Shape {
    let weight = 1u64.saturating_add(bytes as u64);
    Shape {
        weight,
        count: bytes as u64,
        elem: 1,
    }
}

/// Weight of a JSON value: nodes plus string bytes (keys included). Iterative: payloads are
/// bounded in depth, but the data handed to this crate need not have come through that check.
pub(crate) fn weight(value: &Json) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        total = total.saturating_add(1);
        match value {
            Json::String(s) => total = total.saturating_add(s.len() as u64),
            Json::Array(items) => stack.extend(items),
            Json::Object(map) => {
                for (key, item) in map {
                    total = total.saturating_add(key.len() as u64);
                    stack.push(item);
                }
            }
            _ => {}
        }
    }
    total
}

/// The data a variable is bound to.
#[derive(Clone, Copy)]
pub(crate) enum Binding<'j> {
    Object(&'j Map<String, Json>),
    Value(&'j Json),
    Null,
}

/// The variables an expression reads, with their data.
pub(crate) struct Bindings<'j> {
    pub vars: Vec<(&'j str, Binding<'j>)>,
}

/// Estimates the cost of evaluating `expr` and converting its result to JSON (saturating at
/// `u64::MAX`). `None` when measuring the data it reads would itself walk more than `budget`.
pub(crate) fn estimate(expr: &IdedExpr, bindings: &Bindings<'_>, budget: u64) -> Option<u64> {
    let mut estimator = Estimator {
        bindings,
        scopes: Vec::new(),
        measured: HashMap::new(),
        measuring_left: budget,
    };
    let (value, cost) = estimator.walk(expr)?;
    // `execute` turns cel's internal value into a `Value`, then the result is converted to
    // JSON: both copy every element, shared or not.
    let weight = estimator.shape(value)?.weight;
    let total = cost.saturating_add(weight.saturating_mul(2));
    Some(total)
}

struct Estimator<'b, 'j> {
    bindings: &'b Bindings<'j>,
    /// Comprehension variables in scope, innermost last.
    scopes: Vec<(&'b str, Shape)>,
    /// Shapes of data nodes measured so far, by address.
    measured: HashMap<usize, Shape>,
    /// Weight that measuring data may still walk.
    measuring_left: u64,
}

impl<'b, 'j> Estimator<'b, 'j> {
    /// The shape of a value; data is measured once per node, against `measuring_left`.
    fn shape(&mut self, value: Abs<'j>) -> Option<Shape> {
        let address = match value {
            Abs::Bound(shape) => return Some(shape),
            Abs::Object(map) => std::ptr::from_ref(map) as usize,
            Abs::Value(Json::String(s)) => return Some(text(s.len())),
            Abs::Value(v @ (Json::Array(_) | Json::Object(_))) => std::ptr::from_ref(v) as usize,
            Abs::Value(_) => return Some(Shape::opaque(1)),
        };
        if let Some(&shape) = self.measured.get(&address) {
            return Some(shape);
        }
        let (keys, children): (u64, Vec<u64>) = match value {
            Abs::Object(map) | Abs::Value(Json::Object(map)) => (
                map.keys()
                    .fold(0u64, |sum, k| sum.saturating_add(k.len() as u64)),
                map.values().map(weight).collect(),
            ),
            Abs::Value(Json::Array(items)) => (0, items.iter().map(weight).collect()),
            _ => (0, Vec::new()),
        };
        let total = children
            .iter()
            .fold(1u64.saturating_add(keys), |sum, &w| sum.saturating_add(w));
        self.measuring_left = self.measuring_left.checked_sub(total)?;
        let shape = Shape {
            weight: total,
            count: children.len() as u64,
            elem: children.iter().copied().max().unwrap_or(0),
        };
        self.measured.insert(address, shape);
        Some(shape)
    }

    fn lookup(&self, name: &str) -> Abs<'j> {
        if let Some((_, shape)) = self.scopes.iter().rev().find(|(n, _)| *n == name) {
            return Abs::Bound(*shape);
        }
        match self.bindings.vars.iter().find(|(n, _)| *n == name) {
            Some((_, Binding::Object(map))) => Abs::Object(map),
            Some((_, Binding::Value(value))) => Abs::Value(value),
            // Null, or a name that fails at run time.
            _ => Abs::Bound(Shape::opaque(1)),
        }
    }

    /// A member of `value`: exact when `value` is data and the key is known, else bounded by
    /// its heaviest element.
    fn member(&mut self, value: Abs<'j>, key: Option<Key<'_>>) -> Option<Abs<'j>> {
        let found = match (value, key) {
            (Abs::Object(map), Some(Key::Field(field)))
            | (Abs::Value(Json::Object(map)), Some(Key::Field(field))) => map.get(field),
            (Abs::Value(Json::Array(items)), Some(Key::Index(i))) => {
                usize::try_from(i).ok().and_then(|i| items.get(i))
            }
            _ => None,
        };
        match found {
            Some(child) => Some(Abs::Value(child)),
            None => Some(Abs::Bound(Shape::opaque(self.shape(value)?.elem))),
        }
    }

    /// (what the value may be, work to compute it).
    fn walk(&mut self, expr: &'b IdedExpr) -> Option<(Abs<'j>, u64)> {
        match &expr.expr {
            Expr::Unspecified => Some((Abs::Bound(Shape::opaque(1)), 1)),
            Expr::Literal(literal) => {
                let shape = match literal {
                    LiteralValue::String(s) => text(s.inner().len()),
                    LiteralValue::Bytes(b) => text(b.inner().len()),
                    _ => Shape::opaque(1),
                };
                Some((Abs::Bound(shape), 1))
            }
            Expr::Ident(name) => Some((self.lookup(name), 1)),
            Expr::Select(select) => {
                let (operand, cost) = self.walk(&select.operand)?;
                let cost = cost.saturating_add(1);
                if select.test {
                    return Some((Abs::Bound(Shape::opaque(1)), cost));
                }
                Some((self.member(operand, Some(Key::Field(&select.field)))?, cost))
            }
            Expr::Call(call) => self.call(
                &call.func_name,
                call.target.as_deref().into_iter().chain(&call.args),
            ),
            Expr::List(list) => {
                let mut shape = Shape {
                    weight: 1,
                    count: list.elements.len() as u64,
                    elem: 0,
                };
                let mut cost = 1u64;
                for element in &list.elements {
                    let (value, c) = self.walk(element)?;
                    let w = self.shape(value)?.weight;
                    shape.weight = shape.weight.saturating_add(w);
                    shape.elem = shape.elem.max(w);
                    cost = cost.saturating_add(c).saturating_add(1);
                }
                Some((Abs::Bound(shape), cost))
            }
            Expr::Map(map) => self.entries(map.entries.iter().map(|e| &e.expr)),
            Expr::Struct(s) => self.entries(s.entries.iter().map(|e| &e.expr)),
            Expr::Comprehension(comp) => {
                let (range, range_cost) = self.walk(&comp.iter_range)?;
                let range = self.shape(range)?;
                let (init, init_cost) = self.walk(&comp.accu_init)?;
                let init = self.shape(init)?;
                let n = range.count;

                let depth = self.scopes.len();
                let element = Shape::opaque(range.elem);
                self.scopes.push((comp.iter_var.as_str(), element));
                if let Some(var) = &comp.iter_var2 {
                    self.scopes.push((var.as_str(), element));
                }
                // One iteration's growth of the accumulator and its work, with the accumulator
                // itself counted as empty: the macros' steps append to it or fold a bool.
                self.scopes.push((comp.accu_var.as_str(), Shape::default()));
                let (cond, cond_cost) = self.walk(&comp.loop_cond)?;
                let _ = cond;
                let (step, step_cost) = self.walk(&comp.loop_step)?;
                let step = self.shape(step)?;
                self.scopes.truncate(depth);

                let accu = Shape {
                    weight: init.weight.saturating_add(n.saturating_mul(step.weight)),
                    count: init
                        .count
                        .saturating_add(n.saturating_mul(step.count.max(1))),
                    elem: init.elem.max(step.elem),
                };
                self.scopes.push((comp.accu_var.as_str(), accu));
                let (result, result_cost) = self.walk(&comp.result)?;
                self.scopes.truncate(depth);

                let per_item = cond_cost.saturating_add(step_cost).saturating_add(1);
                let cost = range_cost
                    .saturating_add(init_cost)
                    .saturating_add(n.saturating_mul(per_item))
                    // Binding each element copies it: all of them weigh the range at most.
                    .saturating_add(range.weight)
                    .saturating_add(result_cost);
                Some((result, cost))
            }
        }
    }

    fn entries(&mut self, entries: impl Iterator<Item = &'b EntryExpr>) -> Option<(Abs<'j>, u64)> {
        let mut shape = Shape {
            weight: 1,
            count: 0,
            elem: 0,
        };
        let mut cost = 1u64;
        for entry in entries {
            let (key, value) = match entry {
                EntryExpr::StructField(field) => (None, &field.value),
                EntryExpr::MapEntry(entry) => (Some(&entry.key), &entry.value),
            };
            let mut entry_weight = 0u64;
            for part in key.into_iter().chain([value]) {
                let (abs, c) = self.walk(part)?;
                let w = self.shape(abs)?.weight;
                entry_weight = entry_weight.saturating_add(w);
                shape.elem = shape.elem.max(w);
                cost = cost.saturating_add(c).saturating_add(1);
            }
            shape.weight = shape.weight.saturating_add(entry_weight);
            shape.count = shape.count.saturating_add(1);
        }
        Some((Abs::Bound(shape), cost))
    }

    fn call(
        &mut self,
        function: &str,
        args: impl Iterator<Item = &'b IdedExpr>,
    ) -> Option<(Abs<'j>, u64)> {
        let args: Vec<&'b IdedExpr> = args.collect();
        let mut values = Vec::with_capacity(args.len());
        let mut cost = 1u64;
        for arg in &args {
            let (value, c) = self.walk(arg)?;
            cost = cost.saturating_add(c);
            values.push(value);
        }

        if function == operators::INDEX || function == operators::OPT_INDEX {
            let key = match args.get(1).map(|e| &e.expr) {
                Some(Expr::Literal(LiteralValue::String(s))) => Some(Key::Field(s.inner())),
                Some(Expr::Literal(LiteralValue::Int(i))) => Some(Key::Index(*i.inner())),
                Some(Expr::Literal(LiteralValue::UInt(u))) => {
                    i64::try_from(*u.inner()).ok().map(Key::Index)
                }
                _ => None,
            };
            let target = values
                .first()
                .copied()
                .unwrap_or(Abs::Bound(Shape::opaque(1)));
            return Some((self.member(target, key)?, cost.saturating_add(1)));
        }

        let mut shapes = Vec::with_capacity(values.len());
        for value in values {
            shapes.push(self.shape(value)?);
        }
        let total: u64 = shapes
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.weight));

        if function == operators::CONDITIONAL {
            let result = match shapes.as_slice() {
                [_, then, otherwise] => then.join(*otherwise),
                _ => Shape::opaque(total),
            };
            return Some((Abs::Bound(result), cost));
        }
        // Every function may read its arguments whole (a comparison of two lists, `in`).
        let cost = cost.saturating_add(total);
        let result = match function {
            operators::ADD => Shape {
                weight: total,
                count: shapes
                    .iter()
                    .fold(0u64, |sum, s| sum.saturating_add(s.count)),
                elem: shapes.iter().map(|s| s.elem).max().unwrap_or(0),
            },
            operators::LOGICAL_AND
            | operators::LOGICAL_OR
            | operators::LOGICAL_NOT
            | operators::EQUALS
            | operators::NOT_EQUALS
            | operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS
            | operators::IN
            | operators::NOT_STRICTLY_FALSE
            | operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO
            | operators::NEGATE
            | "size"
            | "contains"
            | "startsWith"
            | "endsWith"
            | "int"
            | "uint"
            | "double"
            | "bool"
            | "type" => Shape::opaque(1),
            // Conversions and anything else: no bigger than what goes in, plus a number's text.
            _ => Shape::opaque(total.saturating_add(32)),
        };
        Some((Abs::Bound(result), cost))
    }
}

#[derive(Clone, Copy)]
enum Key<'k> {
    Field(&'k str),
    Index(i64),
}
