//! Reads the text form printed by `Display for Graph` back into a [`Graph`].
//!
//! Attributes may be omitted where PyTorch has a default (stride 1, padding 0,
//! dilation 1, groups 1, eps 1e-5, max-pool stride = kernel); a single number
//! stands for both axes of a pair. `//` starts a comment.

use crate::{
    AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, FlattenAttrs, FusedConv2dAttrs, Graph, IrError, NodeId, Op, OpKind,
    OpRole, PadAttrs, ParseError, TensorFact,
};
use candle_core::DType;
use std::collections::HashMap;
use std::str::FromStr;

mod attrs;
mod lex;

use attrs::{AttrTable, AttrValue};
use lex::{tokenize, Lexer, Token};

struct Parser {
    lexer: Lexer,
    graph: Graph,
    values: HashMap<String, NodeId>,
}

type Result<T> = std::result::Result<T, IrError>;

impl Parser {
    fn peek(&self) -> &Token {
        &self.lexer.tokens[self.lexer.position].0
    }

    fn error_here(&self, message: impl Into<String>) -> IrError {
        let (_, line, column) = &self.lexer.tokens[self.lexer.position];
        IrError::Parse(ParseError {
            line: *line,
            column: *column,
            message: message.into(),
        })
    }

    /// `error` (from building the graph) located at token `position`.
    fn error_at(&mut self, position: usize, error: IrError) -> IrError {
        self.lexer.position = position;
        self.error_here(error.to_string())
    }

    fn next(&mut self) -> Token {
        let token = self.lexer.tokens[self.lexer.position].0.clone();
        if token != Token::End {
            self.lexer.position += 1;
        }
        token
    }

    fn expect_punct(&mut self, c: char) -> Result<()> {
        if self.peek() == &Token::Punct(c) {
            self.next();
            Ok(())
        } else {
            Err(self.error_here(format!("expected `{c}`, found {}", self.peek().describe())))
        }
    }

    /// After a list item: `,` continues (returns true), `close` ends (returns false).
    fn list_continues(&mut self, close: char) -> Result<bool> {
        if self.eat_punct(',') {
            Ok(true)
        } else if self.eat_punct(close) {
            Ok(false)
        } else {
            Err(self.error_here(format!("expected `,` or `{close}`, found {}", self.peek().describe())))
        }
    }

    fn eat_punct(&mut self, c: char) -> bool {
        if self.peek() == &Token::Punct(c) {
            self.next();
            true
        } else {
            false
        }
    }

    fn expect_ident(&mut self, what: &str) -> Result<String> {
        match self.peek().clone() {
            Token::Ident(s) => {
                self.next();
                Ok(s)
            }
            other => Err(self.error_here(format!("expected {what}, found {}", other.describe()))),
        }
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<()> {
        match self.peek() {
            Token::Ident(s) if s == keyword => {
                self.next();
                Ok(())
            }
            other => Err(self.error_here(format!("expected `{keyword}`, found {}", other.describe()))),
        }
    }

    fn number<T: FromStr>(&mut self, what: &str) -> Result<T> {
        match self.peek().clone() {
            Token::Number(s) => {
                let value = s
                    .parse()
                    .map_err(|_| self.error_here(format!("expected {what}, found `{s}`")))?;
                self.next();
                Ok(value)
            }
            other => Err(self.error_here(format!("expected {what}, found {}", other.describe()))),
        }
    }

    fn fact(&mut self) -> Result<TensorFact> {
        let dtype_name = self.expect_ident("a dtype such as f32")?;
        let dtype =
            DType::from_str(&dtype_name).map_err(|_| self.error_here(format!("unknown dtype `{dtype_name}`")))?;
        self.expect_punct('[')?;
        let mut shape = Vec::new();
        if !self.eat_punct(']') {
            loop {
                shape.push(self.number::<usize>("a dimension")?);
                if !self.list_continues(']')? {
                    break;
                }
            }
        }
        Ok(TensorFact::new(dtype, shape))
    }

    fn define(&mut self, name: &str, id: NodeId) {
        self.values.insert(name.to_string(), id);
    }

    fn operand(&mut self) -> Result<NodeId> {
        let (token, is_const) = match self.peek().clone() {
            Token::Value(name) => (name, false),
            Token::Const(name) => (name, true),
            other => {
                return Err(self.error_here(format!(
                    "expected an operand `%name` or `@name`, found {}",
                    other.describe()
                )))
            }
        };
        let Some(&id) = self.values.get(&token) else {
            let sigil = if is_const { '@' } else { '%' };
            return Err(self.error_here(format!("undefined value `{sigil}{token}`")));
        };
        let defined_const = self.graph.node(id).op == Op::Constant;
        if defined_const != is_const {
            return Err(self.error_here(if is_const {
                format!("`@{token}` is not a constant; write `%{token}`")
            } else {
                format!("`%{token}` is a constant; write `@{token}`")
            }));
        }
        self.next();
        Ok(id)
    }

    fn attributes(&mut self) -> Result<Vec<(String, AttrValue, usize)>> {
        let mut attrs: Vec<(String, AttrValue, usize)> = Vec::new();
        if !self.eat_punct('[') {
            return Ok(attrs);
        }
        if self.eat_punct(']') {
            return Ok(attrs);
        }
        loop {
            let position = self.lexer.position;
            let name = self.expect_ident("an attribute name")?;
            if attrs.iter().any(|(n, _, _)| n == &name) {
                self.lexer.position = position;
                return Err(self.error_here(format!("attribute `{name}` given twice")));
            }
            self.expect_punct('=')?;
            let value = if self.eat_punct('[') {
                let mut items = Vec::new();
                loop {
                    match self.next() {
                        Token::Number(n) => items.push(n),
                        other => {
                            self.lexer.position -= 1;
                            return Err(self.error_here(format!("expected a number, found {}", other.describe())));
                        }
                    }
                    if !self.list_continues(']')? {
                        break;
                    }
                }
                AttrValue::List(items)
            } else {
                match self.peek().clone() {
                    Token::Number(n) => {
                        self.next();
                        AttrValue::Number(n)
                    }
                    Token::Ident(word) => {
                        self.next();
                        AttrValue::Word(word)
                    }
                    other => {
                        return Err(
                            self.error_here(format!("expected a value for `{name}`, found {}", other.describe()))
                        )
                    }
                }
            };
            attrs.push((name, value, position));
            if !self.list_continues(']')? {
                return Ok(attrs);
            }
        }
    }

    fn op(&mut self, op_name: &str, op_position: usize) -> Result<Op> {
        let attrs = self.attributes()?;
        let end = self.lexer.position;
        let mut table = AttrTable {
            attrs,
            used: vec![],
            parser: self,
        };
        let unknown = |parser: &mut Parser| {
            parser.lexer.position = op_position;
            let ops: Vec<&str> = OpKind::ALL
                .iter()
                .filter(|kind| kind.role() == OpRole::Computed)
                .map(|kind| kind.name())
                .collect();
            parser.error_here(format!("unknown op `{op_name}`; expected one of {}", ops.join(", ")))
        };
        let Some(kind) = OpKind::from_name(op_name) else {
            return Err(unknown(table.parser));
        };
        let op = match kind {
            OpKind::Conv2d => Op::Conv2d(table.conv()?),
            OpKind::FusedConv2d => Op::FusedConv2d(FusedConv2dAttrs {
                conv: table.conv()?,
                activation: {
                    let relu = table.flag("relu")?;
                    match (relu, table.word("activation")?) {
                        (false, None) => None,
                        (true, None) => Some(crate::Activation::Relu),
                        (false, Some(name)) => Some(
                            crate::Activation::ALL
                                .into_iter()
                                .find(|a| a.op().name() == name)
                                .ok_or_else(|| {
                                    let names: Vec<&str> =
                                        crate::Activation::ALL.iter().map(|a| a.op().name()).collect();
                                    table.parser.error_here(format!(
                                        "unknown activation `{name}`; expected one of {}",
                                        names.join(", ")
                                    ))
                                })?,
                        ),
                        (true, Some(_)) => {
                            return Err(table.parser.error_here("`relu=1` and `activation` together: give one"))
                        }
                    }
                },
                pool: match table.pair("pool_kernel")? {
                    Some(kernel) => Some(table.max_pool("pool_", kernel)?),
                    None => None,
                },
                input_scale: table.flag("input_scale")?,
            }),
            OpKind::BatchNorm => Op::BatchNorm(BatchNormAttrs {
                eps: table.scalar("eps")?.unwrap_or(1e-5),
            }),
            OpKind::MaxPool2d => {
                let kernel = table
                    .pair("kernel")?
                    .ok_or_else(|| table.parser.error_here("max_pool2d needs `kernel`"))?;
                Op::MaxPool2d(table.max_pool("", kernel)?)
            }
            OpKind::AvgPool2d => {
                let kernel = table
                    .pair("kernel")?
                    .ok_or_else(|| table.parser.error_here("avg_pool2d needs `kernel`"))?;
                Op::AvgPool2d(AvgPool2dAttrs {
                    kernel,
                    stride: table.pair("stride")?.unwrap_or(kernel),
                })
            }
            OpKind::Pad => {
                let [top, left] = table
                    .pair("begin")?
                    .ok_or_else(|| table.parser.error_here("pad needs `begin` ([top, left])"))?;
                let [bottom, right] = table
                    .pair("end")?
                    .ok_or_else(|| table.parser.error_here("pad needs `end` ([bottom, right])"))?;
                Op::Pad(PadAttrs {
                    pads: [top, left, bottom, right],
                })
            }
            OpKind::Concat => Op::Concat(ConcatAttrs {
                axis: table
                    .scalar("axis")?
                    .ok_or_else(|| table.parser.error_here("concat needs `axis`"))?,
            }),
            OpKind::Flatten => Op::Flatten(FlattenAttrs {
                start_dim: table
                    .scalar("start_dim")?
                    .ok_or_else(|| table.parser.error_here("flatten needs `start_dim`"))?,
            }),
            OpKind::Relu => Op::Relu,
            OpKind::Relu6 => Op::Relu6,
            OpKind::HardSwish => Op::HardSwish,
            OpKind::HardSigmoid => Op::HardSigmoid,
            OpKind::Sigmoid => Op::Sigmoid,
            OpKind::Silu => Op::Silu,
            OpKind::Add => Op::Add,
            OpKind::Mul => Op::Mul,
            OpKind::GlobalAvgPool2d => Op::GlobalAvgPool2d,
            OpKind::Linear => Op::Linear,
            // Declared in the signature and with `@name = constant`, not as ops.
            OpKind::Input | OpKind::Constant => return Err(unknown(table.parser)),
        };
        table.finish()?;
        self.lexer.position = end;
        Ok(op)
    }

    fn statement(&mut self) -> Result<bool> {
        match self.peek().clone() {
            Token::Ident(word) if word == "return" => {
                self.next();
                let mut outputs = vec![self.operand()?];
                while self.eat_punct(',') {
                    outputs.push(self.operand()?);
                }
                self.graph.set_outputs(outputs);
                Ok(false)
            }
            Token::Const(name) => {
                let position = self.lexer.position;
                self.next();
                self.expect_punct('=')?;
                self.expect_keyword(OpKind::Constant.name())?;
                self.expect_punct(':')?;
                let fact = self.fact()?;
                let added = self.graph.add_constant_decl(name.clone(), fact);
                let id = added.map_err(|e| self.error_at(position, e))?;
                self.define(&name, id);
                Ok(true)
            }
            Token::Value(name) => {
                let position = self.lexer.position;
                self.next();
                self.expect_punct('=')?;
                let op_position = self.lexer.position;
                let op_name = self.expect_ident("an op name")?;
                let op = self.op(&op_name, op_position)?;
                self.expect_punct('(')?;
                let mut inputs = Vec::new();
                if !self.eat_punct(')') {
                    loop {
                        inputs.push(self.operand()?);
                        if !self.list_continues(')')? {
                            break;
                        }
                    }
                }
                self.expect_punct(':')?;
                let fact_position = self.lexer.position;
                let declared = self.fact()?;
                let added = self.graph.add_node(name.clone(), op, &inputs);
                let id = added.map_err(|e| self.error_at(position, e))?;
                let inferred = &self.graph.node(id).fact;
                if inferred != &declared {
                    self.lexer.position = fact_position;
                    return Err(self.error_here(format!(
                        "`%{name}` is annotated {declared} but its op produces {inferred}"
                    )));
                }
                self.define(&name, id);
                Ok(true)
            }
            other => Err(self.error_here(format!(
                "expected a definition `%name = ...`, `@name = constant : ...` or `return`, found {}",
                other.describe()
            ))),
        }
    }

    fn graph(mut self) -> Result<Graph> {
        self.expect_keyword("graph")?;
        let name = match self.next() {
            Token::Ident(name) => name,
            other => {
                self.lexer.position -= 1;
                return Err(self.error_here(format!("expected a graph name, found {}", other.describe())));
            }
        };
        self.graph = Graph::new(name);
        self.expect_punct('(')?;
        if !self.eat_punct(')') {
            loop {
                let position = self.lexer.position;
                let Token::Value(input) = self.next() else {
                    self.lexer.position = position;
                    return Err(self.error_here(format!("expected an input `%name`, found {}", self.peek().describe())));
                };
                self.expect_punct(':')?;
                let fact = self.fact()?;
                let added = self.graph.add_input(input.clone(), fact);
                let id = added.map_err(|e| self.error_at(position, e))?;
                self.define(&input, id);
                if !self.list_continues(')')? {
                    break;
                }
            }
        }
        self.expect_punct('{')?;
        while self.statement()? {}
        self.expect_punct('}')?;
        if self.peek() != &Token::End {
            return Err(self.error_here(format!(
                "expected end of input after `}}`, found {}",
                self.peek().describe()
            )));
        }
        Ok(self.graph)
    }
}

impl Graph {
    /// Parses IR text (as printed by `Display`). Constants get declarations only;
    /// supply their data with [`Graph::set_constant_data`].
    pub fn parse(text: &str) -> std::result::Result<Graph, IrError> {
        let tokens = tokenize(text).map_err(IrError::Parse)?;
        Parser {
            lexer: Lexer { tokens, position: 0 },
            graph: Graph::default(),
            values: HashMap::new(),
        }
        .graph()
    }
}

impl FromStr for Graph {
    type Err = IrError;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        Graph::parse(text)
    }
}
