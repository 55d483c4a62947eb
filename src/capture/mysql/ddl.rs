//! Schema history: the DDL statements of the binlog, applied to the table schemas
//! the capture knows.
//!
//! The binlog identifies a row's columns only by position, so each rows event must
//! be read with the table's schema *at the point it was written*. Reading
//! `information_schema` when a DDL statement streams by gives the schema *now*,
//! which is later than the statement whenever the capture lags: rows written
//! between an `ADD COLUMN` and a following `DROP COLUMN` would be read with the
//! columns of neither. So, as Debezium's schema history does, the capture applies
//! each DDL statement to the schema it holds, in binlog order, and keeps those
//! schemas in its checkpoint so a restart resumes with the schema of its position.
//!
//! Debezium parses the whole MySQL grammar (ANTLR). This is a hand-written reader
//! of the statements that change columns (no crate parses MySQL DDL into column
//! definitions: `sqlparser` drops MySQL's column positions and charsets): `ALTER
//! TABLE` with `ADD`/`DROP`/`MODIFY`/`CHANGE`/`RENAME COLUMN`, primary keys, charset
//! conversion and rename; `RENAME TABLE`; `DROP TABLE`; `TRUNCATE`. `CREATE TABLE`
//! and any clause it does not know come back as [`Ddl::Reload`]: the caller reads
//! `information_schema` for them (the old behaviour), and the table-map check in
//! `binlog` still catches a schema that does not fit the rows.

use super::schema::{db_kind, DbColumn, DbKind, DbTable};

/// A table as a statement names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableName {
    /// The database, when the statement qualifies the name.
    pub db: Option<String>,
    pub name: String,
}

/// What a DDL statement does to the schemas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ddl {
    /// `ALTER TABLE`: the changes in order.
    Alter { table: TableName, changes: Vec<Change> },
    /// `RENAME TABLE a TO b, ...`.
    Rename(Vec<(TableName, TableName)>),
    /// `DROP TABLE a, ...`.
    Drop(Vec<TableName>),
    /// No schema change (`TRUNCATE`, index-only statements).
    None,
    /// Not understood (or `CREATE TABLE`): read these tables' schemas from the
    /// server. An empty list means "every table the statement mentions".
    Reload(Vec<TableName>),
}

/// Where an added or modified column goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    Keep,
    First,
    After(String),
}

/// One clause of an `ALTER TABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Add {
        column: ColumnDef,
        place: Place,
        if_not_exists: bool,
    },
    Drop {
        name: String,
        if_exists: bool,
    },
    /// `MODIFY` (same name) and `CHANGE` (`from` renamed to the definition's name).
    Redefine {
        from: String,
        column: ColumnDef,
        place: Place,
        if_exists: bool,
    },
    RenameColumn {
        from: String,
        to: String,
    },
    RenameTable(TableName),
    AddPrimaryKey(Vec<String>),
    DropPrimaryKey,
    /// `CONVERT TO CHARACTER SET`: every text column and the default.
    Convert {
        latin1: bool,
    },
    /// `[DEFAULT] CHARACTER SET`: the default for columns defined later.
    DefaultCharset {
        latin1: bool,
    },
}

/// A column definition: its name, its type text and charset as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColumnDef {
    pub name: String,
    /// The type's name, lower case (`int`, `varchar`, `double precision`).
    pub data_type: String,
    /// The full type as `information_schema.COLUMN_TYPE` would show it, enough for
    /// [`db_kind`]: arguments and `unsigned`.
    pub column_type: String,
    /// `CHARACTER SET` / `COLLATE` charset, when given.
    pub charset: Option<String>,
    /// Declared `PRIMARY KEY` inline.
    pub primary_key: bool,
}

impl ColumnDef {
    fn to_column(&self, default_latin1: bool) -> DbColumn {
        let charset = self.charset.clone().or_else(|| default_latin1.then(|| "latin1".to_owned()));
        DbColumn {
            name: self.name.clone(),
            kind: db_kind(&self.data_type, &self.column_type, charset.as_deref()),
        }
    }
}

/// Applies one `ALTER TABLE`'s changes to a schema.
///
/// # Errors
/// When the schema does not fit the statement (a column to drop is missing, one to
/// add exists): the history went astray, and the caller reads the server's schema.
pub(crate) fn apply(table: &DbTable, changes: &[Change]) -> Result<DbTable, String> {
    let mut columns = table.columns.clone();
    let mut key: Vec<String> = table.key.iter().map(|&i| columns[i].name.clone()).collect();
    let mut name = table.name.clone();
    let mut latin1 = table.default_latin1;
    let find =
        |columns: &[DbColumn], n: &str| columns.iter().position(|c| c.name.eq_ignore_ascii_case(n));
    let place_at = |columns: &[DbColumn], place: &Place, keep: usize| -> Result<usize, String> {
        match place {
            Place::Keep => Ok(keep),
            Place::First => Ok(0),
            Place::After(after) => find(columns, after)
                .map(|i| i + 1)
                .ok_or_else(|| format!("no column `{after}` to place a column after")),
        }
    };
    for change in changes {
        match change {
            Change::Add { column, place, if_not_exists } => {
                if find(&columns, &column.name).is_some() {
                    if *if_not_exists {
                        continue;
                    }
                    return Err(format!("column `{}` exists already", column.name));
                }
                let at = place_at(&columns, place, columns.len())?;
                columns.insert(at, column.to_column(latin1));
                if column.primary_key {
                    key = vec![column.name.clone()];
                }
            }
            Change::Drop { name: col, if_exists } => match find(&columns, col) {
                Some(i) => {
                    let gone = columns.remove(i);
                    key.retain(|k| !k.eq_ignore_ascii_case(&gone.name));
                }
                None if *if_exists => {}
                None => return Err(format!("no column `{col}` to drop")),
            },
            Change::Redefine { from, column, place, if_exists } => {
                let Some(i) = find(&columns, from) else {
                    if *if_exists {
                        continue;
                    }
                    return Err(format!("no column `{from}` to redefine"));
                };
                let old = columns.remove(i);
                let at = place_at(&columns, place, i)?;
                columns.insert(at, column.to_column(latin1));
                for k in &mut key {
                    if k.eq_ignore_ascii_case(&old.name) {
                        k.clone_from(&column.name);
                    }
                }
                if column.primary_key {
                    key = vec![column.name.clone()];
                }
            }
            Change::RenameColumn { from, to } => {
                let i =
                    find(&columns, from).ok_or_else(|| format!("no column `{from}` to rename"))?;
                for k in &mut key {
                    if k.eq_ignore_ascii_case(from) {
                        k.clone_from(to);
                    }
                }
                columns[i].name.clone_from(to);
            }
            Change::RenameTable(to) => name.clone_from(&to.name),
            Change::AddPrimaryKey(cols) => key.clone_from(cols),
            Change::DropPrimaryKey => key.clear(),
            Change::Convert { latin1: to } => {
                latin1 = *to;
                for c in &mut columns {
                    if let DbKind::Text { latin1 } = &mut c.kind {
                        *latin1 = *to;
                    }
                }
            }
            Change::DefaultCharset { latin1: to } => latin1 = *to,
        }
    }
    let key = key
        .iter()
        .map(|k| find(&columns, k).ok_or_else(|| format!("no key column `{k}`")))
        .collect::<Result<_, _>>()?;
    Ok(DbTable { name, columns, key, default_latin1: latin1 })
}

/// Reads a DDL statement; anything it cannot follow is [`Ddl::Reload`].
pub(crate) fn parse(sql: &str) -> Ddl {
    let tokens = tokenize(sql);
    let mut p = Parser { t: &tokens, i: 0 };
    p.statement().unwrap_or(Ddl::Reload(Vec::new()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// A bare word (keyword or identifier).
    Word(String),
    /// A `backquoted` identifier.
    Quoted(String),
    /// A 'string' or "string" literal.
    Str(String),
    Punct(char),
}

/// Splits SQL into tokens, dropping comments. The body of a versioned comment
/// (`/*!50100 ... */`) is code for the server, so it is kept.
fn tokenize(sql: &str) -> Vec<Tok> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' || (c == '-' && next == Some('-')) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            if chars.get(i + 2) == Some(&'!') {
                i += 3;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            } else {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    i += 1;
                }
                i += 2;
            }
        } else if c == '*' && next == Some('/') {
            // The end of a versioned comment.
            i += 2;
        } else if c == '`' {
            let (s, end) = quoted(&chars, i, '`', false);
            out.push(Tok::Quoted(s));
            i = end;
        } else if c == '\'' || c == '"' {
            let (s, end) = quoted(&chars, i, c, true);
            out.push(Tok::Str(s));
            i = end;
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
            out.push(Tok::Word(chars[start..i].iter().collect()));
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

/// Reads a quoted token starting at `chars[start]` (the quote); a doubled quote is
/// one quote, and in strings a backslash escapes the next character.
fn quoted(chars: &[char], start: usize, q: char, backslash: bool) -> (String, usize) {
    let mut s = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        let c = chars[i];
        if c == q {
            if chars.get(i + 1) == Some(&q) {
                s.push(q);
                i += 2;
                continue;
            }
            return (s, i + 1);
        }
        if backslash && c == '\\' {
            if let Some(&n) = chars.get(i + 1) {
                s.push(n);
                i += 2;
                continue;
            }
        }
        s.push(c);
        i += 1;
    }
    (s, i)
}

struct Parser<'a> {
    t: &'a [Tok],
    i: usize,
}

/// Clause openers of `ALTER TABLE` that change no column.
const NO_COLUMN_CHANGE: &[&str] = &[
    "ALGORITHM",
    "LOCK",
    "ENGINE",
    "COMMENT",
    "AUTO_INCREMENT",
    "ROW_FORMAT",
    "FORCE",
    "ENABLE",
    "DISABLE",
    "ORDER",
    "KEY_BLOCK_SIZE",
    "STATS_PERSISTENT",
    "STATS_AUTO_RECALC",
    "STATS_SAMPLE_PAGES",
    "CHECKSUM",
    "PACK_KEYS",
    "MAX_ROWS",
    "MIN_ROWS",
    "DELAY_KEY_WRITE",
    "INSERT_METHOD",
    "PAGE_CHECKSUM",
    "TRANSACTIONAL",
    "COALESCE",
    "REORGANIZE",
    "ANALYZE",
    "CHECK",
    "OPTIMIZE",
    "REBUILD",
    "REPAIR",
    "REMOVE",
    "PARTITION",
    "EXCHANGE",
    "TRUNCATE",
    "DISCARD",
    "IMPORT",
    "WITH",
    "WITHOUT",
    "VALIDATION",
    "ENCRYPTED",
    "ENCRYPTION_KEY_ID",
];

/// What may follow `ADD` without changing a column.
const ADD_NO_COLUMN: &[&str] =
    &["INDEX", "KEY", "UNIQUE", "FULLTEXT", "SPATIAL", "FOREIGN", "CHECK", "PERIOD", "PARTITION"];
/// What may follow `DROP` without dropping a column.
const DROP_NO_COLUMN: &[&str] =
    &["INDEX", "KEY", "FOREIGN", "CHECK", "CONSTRAINT", "PARTITION", "PERIOD", "SYSTEM"];

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.t.get(self.i)
    }

    fn is(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn is_any(&self, kws: &[&str]) -> bool {
        kws.iter().any(|k| self.is(k))
    }

    fn eat(&mut self, kw: &str) -> bool {
        let yes = self.is(kw);
        if yes {
            self.i += 1;
        }
        yes
    }

    fn eat_punct(&mut self, c: char) -> bool {
        let yes = self.peek() == Some(&Tok::Punct(c));
        if yes {
            self.i += 1;
        }
        yes
    }

    fn eat_all(&mut self, kws: &[&str]) -> bool {
        let start = self.i;
        for k in kws {
            if !self.eat(k) {
                self.i = start;
                return false;
            }
        }
        true
    }

    fn ident(&mut self) -> Option<String> {
        let s = match self.peek()? {
            Tok::Word(w) | Tok::Quoted(w) => w.clone(),
            Tok::Str(s) => s.clone(),
            Tok::Punct(_) => return None,
        };
        self.i += 1;
        Some(s)
    }

    fn table_name(&mut self) -> Option<TableName> {
        let first = self.ident()?;
        if self.eat_punct('.') {
            let name = self.ident()?;
            return Some(TableName { db: Some(first), name });
        }
        Some(TableName { db: None, name: first })
    }

    fn at_end(&self) -> bool {
        matches!(self.peek(), None | Some(Tok::Punct(';')))
    }

    /// Skips to the next top-level comma (not consumed) or the end.
    fn skip_clause(&mut self) {
        let mut depth = 0usize;
        while let Some(t) = self.peek() {
            match t {
                Tok::Punct('(') => depth += 1,
                Tok::Punct(')') => depth = depth.saturating_sub(1),
                Tok::Punct(',') | Tok::Punct(';') if depth == 0 => return,
                _ => {}
            }
            self.i += 1;
        }
    }

    /// A parenthesised list of column names (index parts may carry a length or
    /// an order, which are skipped).
    fn name_list(&mut self) -> Option<Vec<String>> {
        if !self.eat_punct('(') {
            return None;
        }
        let mut names = Vec::new();
        loop {
            names.push(self.ident()?);
            let mut depth = 0usize;
            loop {
                match self.peek()? {
                    Tok::Punct('(') => depth += 1,
                    Tok::Punct(')') if depth == 0 => break,
                    Tok::Punct(')') => depth -= 1,
                    Tok::Punct(',') if depth == 0 => break,
                    _ => {}
                }
                self.i += 1;
            }
            if self.eat_punct(')') {
                return Some(names);
            }
            self.eat_punct(',');
        }
    }

    fn statement(&mut self) -> Option<Ddl> {
        if self.eat("ALTER") {
            self.eat("ONLINE");
            self.eat("OFFLINE");
            self.eat("IGNORE");
            if !self.eat("TABLE") {
                // ALTER DATABASE / VIEW / USER ...: no table schema changes.
                return Some(if self.is_any(&["DATABASE", "SCHEMA", "VIEW", "USER", "EVENT"]) {
                    Ddl::None
                } else {
                    Ddl::Reload(Vec::new())
                });
            }
            self.eat_all(&["IF", "EXISTS"]);
            let table = self.table_name()?;
            if self.eat("WAIT") {
                self.ident()?;
            }
            self.eat("NOWAIT");
            // A clause not understood (or not parsed) sends the table to the server.
            return Some(match self.alter_changes() {
                Some(Some(changes)) => Ddl::Alter { table, changes },
                _ => Ddl::Reload(vec![table]),
            });
        }
        if self.eat("RENAME") {
            if !self.eat("TABLE") && !self.eat("TABLES") {
                return Some(Ddl::None);
            }
            let mut pairs = Vec::new();
            loop {
                let from = self.table_name()?;
                if self.eat("WAIT") {
                    self.ident()?;
                }
                self.eat("NOWAIT");
                if !self.eat("TO") {
                    return None;
                }
                pairs.push((from, self.table_name()?));
                if !self.eat_punct(',') {
                    break;
                }
            }
            return Some(Ddl::Rename(pairs));
        }
        if self.eat("DROP") {
            self.eat("TEMPORARY");
            if !self.eat("TABLE") && !self.eat("TABLES") {
                return Some(Ddl::None);
            }
            self.eat_all(&["IF", "EXISTS"]);
            let mut tables = Vec::new();
            loop {
                tables.push(self.table_name()?);
                if !self.eat_punct(',') {
                    break;
                }
            }
            return Some(Ddl::Drop(tables));
        }
        if self.eat("TRUNCATE") {
            return Some(Ddl::None);
        }
        if self.eat("CREATE") {
            self.eat_all(&["OR", "REPLACE"]);
            self.eat("TEMPORARY");
            if !self.eat("TABLE") {
                // Indexes, views, triggers, databases, users.
                return Some(Ddl::None);
            }
            self.eat_all(&["IF", "NOT", "EXISTS"]);
            return Some(Ddl::Reload(vec![self.table_name()?]));
        }
        // Not a table statement (GRANT, SET, a comment-led statement of another
        // kind): no schema changes, and no reason to read today's schemas.
        Some(Ddl::None)
    }

    /// The clauses of an `ALTER TABLE`; `Some(None)` when one is not understood.
    #[allow(clippy::option_option)]
    fn alter_changes(&mut self) -> Option<Option<Vec<Change>>> {
        let mut changes = Vec::new();
        while !self.at_end() {
            match self.alter_clause()? {
                Some(mut c) => changes.append(&mut c),
                None => return Some(None),
            }
            if !self.eat_punct(',') && !self.at_end() {
                // Table options may follow each other without commas.
                if !self.is_any(NO_COLUMN_CHANGE)
                    && !self.is_any(&["DEFAULT", "CHARACTER", "CHARSET", "COLLATE"])
                {
                    return Some(None);
                }
            }
        }
        Some(Some(changes))
    }

    fn place(&mut self) -> Option<Place> {
        if self.eat("FIRST") {
            return Some(Place::First);
        }
        if self.eat("AFTER") {
            return Some(Place::After(self.ident()?));
        }
        Some(Place::Keep)
    }

    /// One clause; `Some(None)` when it is not understood.
    #[allow(clippy::option_option)]
    fn alter_clause(&mut self) -> Option<Option<Vec<Change>>> {
        if self.eat("ADD") {
            if self.eat("CONSTRAINT") && !self.is_any(&["PRIMARY", "UNIQUE", "FOREIGN", "CHECK"]) {
                self.ident()?;
            }
            if self.eat_all(&["PRIMARY", "KEY"]) {
                if self.eat("USING") {
                    self.ident()?;
                }
                let cols = self.name_list()?;
                self.skip_clause();
                return Some(Some(vec![Change::AddPrimaryKey(cols)]));
            }
            if self.is_any(ADD_NO_COLUMN) {
                self.skip_clause();
                return Some(Some(Vec::new()));
            }
            self.eat("COLUMN");
            let if_not_exists = self.eat_all(&["IF", "NOT", "EXISTS"]);
            if self.eat_punct('(') {
                let mut out = Vec::new();
                loop {
                    if self.is_any(&["PRIMARY", "INDEX", "KEY", "UNIQUE", "CONSTRAINT"]) {
                        return Some(None);
                    }
                    let column = self.column_def()?;
                    out.push(Change::Add { column, place: Place::Keep, if_not_exists });
                    if self.eat_punct(')') {
                        return Some(Some(out));
                    }
                    if !self.eat_punct(',') {
                        return None;
                    }
                }
            }
            let column = self.column_def()?;
            let place = self.place()?;
            return Some(Some(vec![Change::Add { column, place, if_not_exists }]));
        }
        if self.eat("DROP") {
            if self.eat_all(&["PRIMARY", "KEY"]) {
                return Some(Some(vec![Change::DropPrimaryKey]));
            }
            if self.is_any(DROP_NO_COLUMN) {
                self.skip_clause();
                return Some(Some(Vec::new()));
            }
            self.eat("COLUMN");
            let if_exists = self.eat_all(&["IF", "EXISTS"]);
            let name = self.ident()?;
            self.eat("RESTRICT");
            self.eat("CASCADE");
            return Some(Some(vec![Change::Drop { name, if_exists }]));
        }
        if self.eat("MODIFY") {
            self.eat("COLUMN");
            let if_exists = self.eat_all(&["IF", "EXISTS"]);
            let column = self.column_def()?;
            let place = self.place()?;
            let from = column.name.clone();
            return Some(Some(vec![Change::Redefine { from, column, place, if_exists }]));
        }
        if self.eat("CHANGE") {
            self.eat("COLUMN");
            let if_exists = self.eat_all(&["IF", "EXISTS"]);
            let from = self.ident()?;
            let column = self.column_def()?;
            let place = self.place()?;
            return Some(Some(vec![Change::Redefine { from, column, place, if_exists }]));
        }
        if self.eat("RENAME") {
            if self.eat("COLUMN") {
                let from = self.ident()?;
                if !self.eat("TO") {
                    return None;
                }
                let to = self.ident()?;
                return Some(Some(vec![Change::RenameColumn { from, to }]));
            }
            if self.is_any(&["INDEX", "KEY"]) {
                self.skip_clause();
                return Some(Some(Vec::new()));
            }
            if !self.eat("TO") {
                self.eat("AS");
            }
            return Some(Some(vec![Change::RenameTable(self.table_name()?)]));
        }
        if self.eat("ALTER") {
            // ALTER [COLUMN] c SET/DROP DEFAULT, ALTER INDEX ... VISIBLE: no type change.
            self.skip_clause();
            return Some(Some(Vec::new()));
        }
        if self.eat("CONVERT") {
            if !self.eat("TO") {
                return Some(None);
            }
            let cs = self.charset_clause()?;
            self.skip_clause();
            return Some(Some(vec![Change::Convert { latin1: is_latin1(&cs) }]));
        }
        if self.is_any(&["DEFAULT", "CHARACTER", "CHARSET", "COLLATE"]) {
            self.eat("DEFAULT");
            let cs = self.charset_clause()?;
            return Some(Some(vec![Change::DefaultCharset { latin1: is_latin1(&cs) }]));
        }
        if self.is_any(NO_COLUMN_CHANGE) {
            // Table options: skip one option (`ENGINE = InnoDB`), or the rest of
            // the clause.
            self.i += 1;
            if self.eat_punct('=') || self.is_any(&["BY"]) {
                self.skip_option_value();
            } else {
                self.skip_clause();
            }
            return Some(Some(Vec::new()));
        }
        Some(None)
    }

    /// `CHARACTER SET [=] cs`, `CHARSET [=] cs` or `COLLATE [=] coll`: the charset.
    fn charset_clause(&mut self) -> Option<String> {
        if self.eat_all(&["CHARACTER", "SET"]) || self.eat("CHARSET") {
            self.eat_punct('=');
            let cs = self.ident()?;
            if self.eat("COLLATE") {
                self.eat_punct('=');
                self.ident()?;
            }
            return Some(cs);
        }
        if self.eat("COLLATE") {
            self.eat_punct('=');
            let coll = self.ident()?;
            return Some(coll.split('_').next().unwrap_or("").to_owned());
        }
        None
    }

    /// One table option's value: a word, a string or a parenthesised list.
    fn skip_option_value(&mut self) {
        if self.eat_punct('(') {
            let mut depth = 1usize;
            while let Some(t) = self.peek() {
                self.i += 1;
                match t {
                    Tok::Punct('(') => depth += 1,
                    Tok::Punct(')') => {
                        depth -= 1;
                        if depth == 0 {
                            return;
                        }
                    }
                    _ => {}
                }
            }
            return;
        }
        self.eat("BY");
        if !self.at_end() && self.peek() != Some(&Tok::Punct(',')) {
            self.i += 1;
        }
    }

    /// `name type[(args)] [UNSIGNED] [ZEROFILL] attributes...`, up to a top-level
    /// comma, closing parenthesis, `FIRST` or `AFTER`.
    fn column_def(&mut self) -> Option<ColumnDef> {
        let name = self.ident()?;
        let mut data_type = match self.peek()? {
            Tok::Word(w) => w.to_ascii_lowercase(),
            _ => return None,
        };
        self.i += 1;
        // Two-word type names.
        for (first, second, as_) in [
            ("double", "precision", "double"),
            ("long", "varchar", "mediumtext"),
            ("long", "varbinary", "mediumblob"),
            ("national", "char", "char"),
            ("national", "varchar", "varchar"),
            ("character", "varying", "varchar"),
            ("char", "varying", "varchar"),
        ] {
            if data_type == first && self.eat(second) {
                as_.clone_into(&mut data_type);
            }
        }
        if data_type == "national" || data_type == "character" {
            // `NATIONAL CHARACTER [VARYING]`, `CHARACTER`.
            data_type = if self.eat("CHARACTER") && self.eat("VARYING") || self.eat("VARYING") {
                "varchar".into()
            } else {
                "char".into()
            };
        }
        let mut column_type = data_type.clone();
        let mut charset = None;
        if self.eat_punct('(') {
            column_type.push('(');
            while !self.eat_punct(')') {
                match self.peek()? {
                    Tok::Str(s) => {
                        column_type.push('\'');
                        column_type.push_str(&s.replace('\'', "''"));
                        column_type.push('\'');
                    }
                    Tok::Word(w) | Tok::Quoted(w) => column_type.push_str(w),
                    Tok::Punct(c) => column_type.push(*c),
                }
                self.i += 1;
            }
            column_type.push(')');
        }
        match data_type.as_str() {
            "nchar" | "nvarchar" => charset = Some("utf8mb3".to_owned()),
            "serial" => column_type.push_str(" unsigned"),
            _ => {}
        }
        let data_type = canonical_type(&data_type);
        if !KNOWN_TYPES.contains(&data_type) {
            // Not a type: a clause this reader does not know (`ADD SYSTEM VERSIONING`).
            return None;
        }
        let mut primary_key = false;
        let mut depth = 0usize;
        loop {
            if depth == 0 && (self.at_end() || self.is("FIRST") || self.is("AFTER")) {
                break;
            }
            match self.peek()? {
                Tok::Punct(',') | Tok::Punct(')') if depth == 0 => break,
                Tok::Punct('(') => {
                    depth += 1;
                    self.i += 1;
                }
                Tok::Punct(')') => {
                    depth -= 1;
                    self.i += 1;
                }
                Tok::Word(w) if depth == 0 && w.eq_ignore_ascii_case("UNSIGNED") => {
                    column_type.push_str(" unsigned");
                    self.i += 1;
                }
                Tok::Word(w)
                    if depth == 0
                        && (w.eq_ignore_ascii_case("CHARACTER")
                            || w.eq_ignore_ascii_case("CHARSET")
                            || w.eq_ignore_ascii_case("COLLATE")) =>
                {
                    let cs = self.charset_clause()?;
                    if charset.is_none() || !w.eq_ignore_ascii_case("COLLATE") {
                        charset = Some(cs);
                    }
                }
                Tok::Word(w) if depth == 0 && w.eq_ignore_ascii_case("PRIMARY") => {
                    self.i += 1;
                    primary_key = self.eat("KEY");
                }
                _ => self.i += 1,
            }
        }
        Some(ColumnDef { name, data_type: data_type.to_owned(), column_type, charset, primary_key })
    }
}

/// The type names [`canonical_type`] gives; anything else is not a column definition.
const KNOWN_TYPES: &[&str] = &[
    "tinyint",
    "smallint",
    "mediumint",
    "int",
    "bigint",
    "decimal",
    "float",
    "double",
    "bit",
    "date",
    "datetime",
    "timestamp",
    "time",
    "year",
    "char",
    "varchar",
    "binary",
    "varbinary",
    "tinytext",
    "text",
    "mediumtext",
    "longtext",
    "tinyblob",
    "blob",
    "mediumblob",
    "longblob",
    "json",
    "enum",
    "set",
    "geometry",
    "point",
    "linestring",
    "polygon",
    "multipoint",
    "multilinestring",
    "multipolygon",
    "geometrycollection",
    "inet4",
    "inet6",
    "uuid",
    "vector",
];

/// MySQL's type synonyms, as `information_schema.DATA_TYPE` names them.
fn canonical_type(t: &str) -> &str {
    match t {
        "integer" | "int4" => "int",
        "int1" => "tinyint",
        "int2" => "smallint",
        "int3" | "middleint" => "mediumint",
        "int8" => "bigint",
        "serial" => "bigint",
        "dec" | "fixed" | "numeric" => "decimal",
        "real" | "float8" => "double",
        "float4" => "float",
        "bool" | "boolean" => "tinyint",
        "nchar" => "char",
        "nvarchar" => "varchar",
        t => t,
    }
}

fn is_latin1(charset: &str) -> bool {
    charset.eq_ignore_ascii_case("latin1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(db: Option<&str>, name: &str) -> TableName {
        TableName { db: db.map(Into::into), name: name.into() }
    }

    fn table(cols: &[(&str, DbKind)], key: &[usize]) -> DbTable {
        DbTable {
            name: "t".into(),
            columns: cols
                .iter()
                .map(|(n, k)| DbColumn { name: (*n).into(), kind: k.clone() })
                .collect(),
            key: key.to_vec(),
            default_latin1: false,
        }
    }

    const INT: DbKind = DbKind::Integer { bits: 32, unsigned: false };
    const TEXT: DbKind = DbKind::Text { latin1: false };

    fn alter(sql: &str, on: &DbTable) -> DbTable {
        match parse(sql) {
            Ddl::Alter { changes, .. } => apply(on, &changes).unwrap(),
            other => panic!("{sql}: {other:?}"),
        }
    }

    fn names(t: &DbTable) -> Vec<&str> {
        t.columns.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn add_and_drop_columns_in_place() {
        let base = table(&[("id", INT), ("a", TEXT)], &[0]);
        let t1 = alter("ALTER TABLE t ADD COLUMN b INT UNSIGNED NOT NULL DEFAULT 0", &base);
        assert_eq!(names(&t1), ["id", "a", "b"]);
        assert_eq!(t1.columns[2].kind, DbKind::Integer { bits: 32, unsigned: true });
        let t2 = alter("alter table `t` drop `a`", &t1);
        assert_eq!(names(&t2), ["id", "b"]);
        assert_eq!(t2.key, [0]);
        let t3 = alter(
            "ALTER TABLE shop.t ADD c DATETIME(6) FIRST, ADD d ENUM('x','y''z') AFTER id",
            &t2,
        );
        assert_eq!(names(&t3), ["c", "id", "d", "b"]);
        assert_eq!(t3.key, [1]);
        assert_eq!(t3.columns[2].kind, DbKind::Enum(vec!["x".into(), "y'z".into()]));
        let t4 = alter(
            "ALTER TABLE t ADD COLUMN (e VARCHAR(3) CHARACTER SET latin1, f DECIMAL(10,2))",
            &t3,
        );
        assert_eq!(names(&t4), ["c", "id", "d", "b", "e", "f"]);
        assert_eq!(t4.columns[4].kind, DbKind::Text { latin1: true });
        assert_eq!(t4.columns[5].kind, DbKind::Decimal);
    }

    #[test]
    fn modify_change_and_rename_keep_positions_and_keys() {
        let base = table(&[("id", INT), ("a", TEXT), ("b", INT)], &[0]);
        let t1 =
            alter("ALTER TABLE t MODIFY COLUMN a BIGINT, CHANGE id order_id INT UNSIGNED", &base);
        assert_eq!(names(&t1), ["order_id", "a", "b"]);
        assert_eq!(t1.columns[1].kind, DbKind::Integer { bits: 64, unsigned: false });
        assert_eq!(t1.key, [0]);
        let t2 = alter("ALTER TABLE t RENAME COLUMN b TO c, MODIFY a BIGINT AFTER c", &t1);
        assert_eq!(names(&t2), ["order_id", "c", "a"]);
        let t3 = alter("ALTER TABLE t DROP PRIMARY KEY, ADD PRIMARY KEY (c, a(10))", &t2);
        assert_eq!(t3.key, [1, 2]);
        let t4 = alter("ALTER TABLE t RENAME TO u", &t3);
        assert_eq!(t4.name, "u");
    }

    #[test]
    fn charset_conversion_and_defaults() {
        let base = table(&[("id", INT), ("a", TEXT)], &[0]);
        let t1 =
            alter("ALTER TABLE t CONVERT TO CHARACTER SET latin1 COLLATE latin1_swedish_ci", &base);
        assert_eq!(t1.columns[1].kind, DbKind::Text { latin1: true });
        let t2 = alter("ALTER TABLE t ADD b TEXT", &t1);
        assert_eq!(t2.columns[2].kind, DbKind::Text { latin1: true });
        let t3 =
            alter("ALTER TABLE t DEFAULT CHARSET = utf8mb4, ADD c TEXT COLLATE utf8mb4_bin", &t2);
        assert_eq!(t3.columns[3].kind, TEXT);
        assert!(!t3.default_latin1);
    }

    #[test]
    fn index_and_option_clauses_change_no_column() {
        let base = table(&[("id", INT), ("a", TEXT)], &[0]);
        for sql in [
            "ALTER TABLE t ADD INDEX ix_a (a)",
            "ALTER TABLE t ADD UNIQUE KEY (a), DROP INDEX ix_b",
            "ALTER TABLE t ENGINE = InnoDB, ALGORITHM=INPLACE, LOCK=NONE",
            "ALTER TABLE t ALTER COLUMN a SET DEFAULT 'x,y'",
            "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES u (id) ON DELETE CASCADE",
            "/* by the ERP */ ALTER TABLE t COMMENT 'orders, v2'",
        ] {
            assert_eq!(alter(sql, &base), base, "{sql}");
        }
    }

    #[test]
    fn table_statements() {
        assert_eq!(
            parse("RENAME TABLE a TO b, shop.c TO shop.d"),
            Ddl::Rename(vec![
                (t(None, "a"), t(None, "b")),
                (t(Some("shop"), "c"), t(Some("shop"), "d"))
            ])
        );
        assert_eq!(
            parse("DROP TABLE IF EXISTS `a`, b /* generated by server */"),
            Ddl::Drop(vec![t(None, "a"), t(None, "b")])
        );
        assert_eq!(parse("TRUNCATE TABLE t"), Ddl::None);
        assert_eq!(parse("/* tool */ GRANT SELECT ON shop.t TO u"), Ddl::None);
        assert_eq!(parse("CREATE INDEX ix ON t (a)"), Ddl::None);
        assert_eq!(
            parse("CREATE TABLE IF NOT EXISTS t (id INT PRIMARY KEY)"),
            Ddl::Reload(vec![t(None, "t")])
        );
        assert_eq!(parse("ALTER TABLE t ADD SYSTEM VERSIONING"), Ddl::Reload(vec![t(None, "t")]));
    }

    #[test]
    fn a_history_that_went_astray_is_an_error() {
        let base = table(&[("id", INT), ("a", TEXT)], &[0]);
        let Ddl::Alter { changes, .. } = parse("ALTER TABLE t DROP COLUMN nope") else { panic!() };
        assert!(apply(&base, &changes).is_err());
        let Ddl::Alter { changes, .. } = parse("ALTER TABLE t ADD COLUMN a INT") else { panic!() };
        assert!(apply(&base, &changes).is_err());
        let Ddl::Alter { changes, .. } = parse("ALTER TABLE t ADD COLUMN IF NOT EXISTS a INT")
        else {
            panic!()
        };
        assert_eq!(apply(&base, &changes).unwrap(), base);
    }
}
