//! Static type checks of step expressions against the declared run inputs.
//!
//! Not a full CEL type checker: it knows the types of literals, of declared `inputs.<name>` and
//! of what operators and a few functions return, and reports only combinations that fail for
//! every value of those types at run time (`inputs.room_id + 1`, `size(inputs.image_count)`,
//! `inputs.room_id.floor`). Anything it cannot be sure of (upstream outputs, `any` inputs,
//! `number` inputs that may be whole) it leaves to run time.

use std::collections::HashMap;

use cel::Program;
use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators};

use crate::expr::INPUTS_VAR;
use crate::inputs::{DeclaredInput, InputType};

/// What is known of a value's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    String,
    Int,
    UInt,
    Double,
    /// An int or a double (a declared `number`).
    Number,
    Bool,
    List,
    Object,
    Bytes,
    Null,
    Unknown,
}

impl Ty {
    fn of_input(kind: InputType) -> Self {
        match kind {
            InputType::String => Ty::String,
            InputType::Int => Ty::Int,
            InputType::Number => Ty::Number,
            InputType::Bool => Ty::Bool,
            InputType::List => Ty::List,
            InputType::Object => Ty::Object,
            InputType::Any => Ty::Unknown,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Ty::String => "a string",
            Ty::Int => "an int",
            Ty::UInt => "a uint",
            Ty::Double => "a double",
            Ty::Number => "a number",
            Ty::Bool => "a bool",
            Ty::List => "a list",
            Ty::Object => "an object",
            Ty::Bytes => "bytes",
            Ty::Null => "null",
            Ty::Unknown => "a value",
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::UInt | Ty::Double | Ty::Number)
    }

    /// The concrete types this one may be at run time (`None`: anything).
    fn options(self) -> Option<&'static [Ty]> {
        match self {
            Ty::Unknown => None,
            Ty::Number => Some(&[Ty::Int, Ty::Double]),
            Ty::String => Some(&[Ty::String]),
            Ty::Int => Some(&[Ty::Int]),
            Ty::UInt => Some(&[Ty::UInt]),
            Ty::Double => Some(&[Ty::Double]),
            Ty::Bool => Some(&[Ty::Bool]),
            Ty::List => Some(&[Ty::List]),
            Ty::Object => Some(&[Ty::Object]),
            Ty::Bytes => Some(&[Ty::Bytes]),
            Ty::Null => Some(&[Ty::Null]),
        }
    }
}

/// Whether `ok` fails for every pair of concrete types `a` and `b` may be.
fn always_fails(a: Ty, b: Ty, ok: impl Fn(Ty, Ty) -> bool) -> bool {
    let (Some(xs), Some(ys)) = (a.options(), b.options()) else {
        return false;
    };
    xs.iter().all(|&x| ys.iter().all(|&y| !ok(x, y)))
}

/// Problems of `program`, each a message for the expression's field path.
pub(crate) fn check(program: &Program, declared: &[DeclaredInput]) -> Vec<String> {
    let mut checker = Checker::new(declared);
    checker.infer(program.expression(), false);
    checker.problems.dedup();
    checker.problems
}

/// What a `when`, a filter or a `for_each` must return.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wanted {
    Bool,
    List,
}

/// What `program` surely returns when that is not `wanted` (e.g. "a string" for a `for_each`),
/// else `None` (it is right, or not known before it runs).
pub(crate) fn wrong_result(
    program: &Program,
    declared: &[DeclaredInput],
    wanted: Wanted,
) -> Option<&'static str> {
    let ty = Checker::new(declared).infer(program.expression(), false);
    let wanted = match wanted {
        Wanted::Bool => Ty::Bool,
        Wanted::List => Ty::List,
    };
    always_fails(ty, ty, |x, _| x == wanted).then_some(ty.name())
}

struct Checker<'d> {
    types: HashMap<&'d str, Ty>,
    problems: Vec<String>,
}

impl<'d> Checker<'d> {
    fn new(declared: &'d [DeclaredInput]) -> Self {
        Checker {
            types: declared
                .iter()
                .map(|input| (input.name.as_str(), Ty::of_input(input.kind)))
                .collect(),
            problems: Vec::new(),
        }
    }

    /// `inputs.<name>` (when `inputs` is not rebound), described for a message.
    fn describe(&self, expr: &IdedExpr, ty: Ty, shadowed: bool) -> String {
        if !shadowed
            && let Expr::Select(select) = &expr.expr
            && let Expr::Ident(name) = &select.operand.expr
            && name == INPUTS_VAR
        {
            return format!("inputs.{} ({})", select.field, ty.name());
        }
        ty.name().to_owned()
    }

    fn infer(&mut self, expr: &IdedExpr, shadowed: bool) -> Ty {
        match &expr.expr {
            Expr::Unspecified | Expr::Struct(_) => Ty::Unknown,
            Expr::Literal(literal) => match literal {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(_) => Ty::Bytes,
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::Null => Ty::Null,
                LiteralValue::String(_) => Ty::String,
                LiteralValue::UInt(_) => Ty::UInt,
            },
            Expr::Ident(_) => Ty::Unknown,
            Expr::List(list) => {
                for element in &list.elements {
                    self.infer(element, shadowed);
                }
                Ty::List
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(e) = &entry.expr {
                        self.infer(&e.key, shadowed);
                        self.infer(&e.value, shadowed);
                    }
                }
                Ty::Object
            }
            Expr::Comprehension(comp) => {
                let rebinds = crate::expr::rebinds_inputs(comp);
                self.infer(&comp.iter_range, shadowed);
                self.infer(&comp.accu_init, shadowed);
                for inner in [&comp.loop_cond, &comp.loop_step, &comp.result] {
                    self.infer(inner, shadowed || rebinds);
                }
                Ty::Unknown
            }
            Expr::Select(select) => {
                if !shadowed
                    && let Expr::Ident(name) = &select.operand.expr
                    && name == INPUTS_VAR
                {
                    let ty = self.types.get(select.field.as_str()).copied();
                    return if select.test {
                        Ty::Bool
                    } else {
                        ty.unwrap_or(Ty::Unknown)
                    };
                }
                let operand = self.infer(&select.operand, shadowed);
                if matches!(
                    operand,
                    Ty::String
                        | Ty::Int
                        | Ty::UInt
                        | Ty::Double
                        | Ty::Number
                        | Ty::Bool
                        | Ty::List
                        | Ty::Bytes
                ) {
                    let what = self.describe(&select.operand, operand, shadowed);
                    self.problems.push(format!(
                        "{what} has no field {:?}: only an object has fields",
                        select.field
                    ));
                }
                if select.test { Ty::Bool } else { Ty::Unknown }
            }
            Expr::Call(call) => self.call(call, shadowed),
        }
    }

    fn call(&mut self, call: &cel::common::ast::CallExpr, shadowed: bool) -> Ty {
        let target = call.target.as_deref().map(|t| (t, self.infer(t, shadowed)));
        let args: Vec<(&IdedExpr, Ty)> = call
            .args
            .iter()
            .map(|a| (a, self.infer(a, shadowed)))
            .collect();
        fn binary<'e>(args: &[(&'e IdedExpr, Ty)]) -> Option<(&'e IdedExpr, Ty, &'e IdedExpr, Ty)> {
            match args {
                [(a, x), (b, y)] => Some((*a, *x, *b, *y)),
                _ => None,
            }
        }
        match call.func_name.as_str() {
            operators::ADD => {
                let Some((a, x, b, y)) = binary(&args) else {
                    return Ty::Unknown;
                };
                let ok = |x: Ty, y: Ty| {
                    x == y
                        && matches!(
                            x,
                            Ty::Int | Ty::UInt | Ty::Double | Ty::String | Ty::List | Ty::Bytes
                        )
                };
                if always_fails(x, y, ok) {
                    let (a, b) = (self.describe(a, x, shadowed), self.describe(b, y, shadowed));
                    self.problems.push(format!("`+` cannot add {a} and {b}"));
                    return Ty::Unknown;
                }
                if x == y { x } else { Ty::Unknown }
            }
            operators::SUBSTRACT | operators::MULTIPLY | operators::DIVIDE | operators::MODULO => {
                let Some((a, x, b, y)) = binary(&args) else {
                    return Ty::Unknown;
                };
                let ok = |x: Ty, y: Ty| x == y && matches!(x, Ty::Int | Ty::UInt | Ty::Double);
                if always_fails(x, y, ok) {
                    let op = &call.func_name[1..call.func_name.len() - 1];
                    let (a, b) = (self.describe(a, x, shadowed), self.describe(b, y, shadowed));
                    let mixed = if x.numeric() && y.numeric() {
                        " (CEL does not mix ints and doubles: convert one with int() or double())"
                    } else {
                        ""
                    };
                    self.problems
                        .push(format!("`{op}` cannot combine {a} and {b}{mixed}"));
                    return Ty::Unknown;
                }
                if x == y { x } else { Ty::Unknown }
            }
            operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS => {
                if let Some((a, x, b, y)) = binary(&args) {
                    let ok = |x: Ty, y: Ty| {
                        (x.numeric() && y.numeric())
                            || (x == y && matches!(x, Ty::String | Ty::Bool | Ty::Bytes))
                    };
                    if always_fails(x, y, ok) {
                        let op = &call.func_name[1..call.func_name.len() - 1];
                        let (a, b) = (self.describe(a, x, shadowed), self.describe(b, y, shadowed));
                        self.problems
                            .push(format!("`{op}` cannot compare {a} with {b}"));
                    }
                }
                Ty::Bool
            }
            operators::EQUALS
            | operators::NOT_EQUALS
            | operators::LOGICAL_AND
            | operators::LOGICAL_OR => Ty::Bool,
            operators::LOGICAL_NOT => {
                if let [(a, x)] = args[..]
                    && always_fails(x, Ty::Bool, |x, _| x == Ty::Bool)
                {
                    let a = self.describe(a, x, shadowed);
                    self.problems.push(format!("`!` takes a bool, not {a}"));
                }
                Ty::Bool
            }
            operators::NEGATE => {
                if let [(a, x)] = args[..]
                    && always_fails(x, x, |x, _| matches!(x, Ty::Int | Ty::Double))
                {
                    let a = self.describe(a, x, shadowed);
                    self.problems.push(format!("`-` takes a number, not {a}"));
                    return Ty::Unknown;
                }
                args.first().map_or(Ty::Unknown, |(_, x)| *x)
            }
            operators::CONDITIONAL => {
                if let [(c, x), (_, y), (_, z)] = args[..] {
                    if always_fails(x, x, |x, _| x == Ty::Bool) {
                        let c = self.describe(c, x, shadowed);
                        self.problems
                            .push(format!("the condition of `? :` must be a bool, not {c}"));
                    }
                    if y == z {
                        return y;
                    }
                }
                Ty::Unknown
            }
            operators::INDEX => {
                if let Some((a, x, _, _)) = binary(&args)
                    && always_fails(x, x, |x, _| matches!(x, Ty::List | Ty::Object))
                {
                    let a = self.describe(a, x, shadowed);
                    self.problems.push(format!(
                        "{a} cannot be indexed: only a list or an object can"
                    ));
                }
                Ty::Unknown
            }
            operators::IN => {
                if let Some((_, _, b, y)) = binary(&args)
                    && always_fails(y, y, |y, _| matches!(y, Ty::List | Ty::Object))
                {
                    let b = self.describe(b, y, shadowed);
                    self.problems
                        .push(format!("`in` looks into a list or an object, not {b}"));
                }
                Ty::Bool
            }
            "size" => {
                let subject = target.or_else(|| args.first().copied());
                if let Some((a, x)) = subject
                    && always_fails(x, x, |x, _| {
                        matches!(x, Ty::String | Ty::List | Ty::Object | Ty::Bytes)
                    })
                {
                    let a = self.describe(a, x, shadowed);
                    self.problems.push(format!(
                        "size() takes a string, a list or an object, not {a}"
                    ));
                }
                Ty::Int
            }
            "startsWith" | "endsWith" | "contains" | "matches" => {
                if let Some((a, x)) = target
                    && always_fails(x, x, |x, _| x == Ty::String)
                {
                    let a = self.describe(a, x, shadowed);
                    self.problems.push(format!(
                        "{}() works on a string, not on {a}",
                        call.func_name
                    ));
                }
                Ty::Bool
            }
            "int" => Ty::Int,
            "uint" => Ty::UInt,
            "double" => Ty::Double,
            "string" => Ty::String,
            "bool" => Ty::Bool,
            _ => Ty::Unknown,
        }
    }
}
