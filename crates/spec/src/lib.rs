//! Workflow specs: parsing, validation and compilation of DAGs, CEL expressions
