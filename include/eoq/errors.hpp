#pragma once
// Every exception eoq throws derives from eoq::Error. The subclasses are the
// distinctions a caller can act on: fix the input, give the task up, retry later.
#include <stdexcept>
#include <string>

namespace eoq {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad input: names the field and the rule it broke. Nothing was written.
class InvalidArgument : public Error {
 public:
  InvalidArgument(std::string field, std::string rule)
      : Error(field + ": " + rule), field_(std::move(field)), rule_(std::move(rule)) {}
  const std::string& field() const noexcept { return field_; }
  const std::string& rule() const noexcept { return rule_; }

 private:
  std::string field_, rule_;
};

// The lease no longer matches the task (another owner claimed it, it finished,
// or it was cancelled and settled). Nothing was changed.
// A key reused with a different type or payload than the task that holds it
// (NewTask::key_reuse = KeyReuse::strict, the default): the caller likely meant
// another task, or reused a key by mistake. Nothing was written. field() is the
// key's field ("key", or "tasks[3].key" in a batch).
class KeyConflict : public InvalidArgument {
 public:
  // `differs`: "type", "payload" or "type and payload"; `holder`: who has the key
  // ("task 42", or "tasks[1] of this batch"); `existing_id`: that task's id, 0
  // when it is an earlier task of the same batch. Payloads compare as JSON
  // values (jsonb equality), not as text.
  KeyConflict(std::string field, std::string key, std::string differs, std::string holder, long long existing_id)
      : InvalidArgument(field, conflict(key, differs, holder) + " (KeyReuse::lenient returns the existing task "
                                                                 "instead)"),
        key_(std::move(key)),
        differs_(std::move(differs)),
        holder_(std::move(holder)),
        existing_id_(existing_id) {}
  const std::string& key() const noexcept { return key_; }
  const std::string& differs() const noexcept { return differs_; }
  const std::string& holder() const noexcept { return holder_; }
  long long existing_task_id() const noexcept { return existing_id_; }
  // The conflict without the C++ remedy, for front ends that name their own
  // (a command-line flag, a JSON field).
  std::string conflict() const { return conflict(key_, differs_, holder_); }

 private:
  static std::string conflict(const std::string& key, const std::string& differs, const std::string& holder) {
    return "'" + key + "' is already used by " + holder + " with a different " + differs +
           "; a key may be reused only with the same type and payload";
  }
  std::string key_, differs_, holder_;
  long long existing_id_;
};

class LeaseLost : public Error {
 public:
  LeaseLost(long long task_id, long long version, const std::string& why)
      : Error("lease lost on task " + std::to_string(task_id) + " (version " +
              std::to_string(version) + "): " + why),
        task_id_(task_id) {}
  long long task_id() const noexcept { return task_id_; }

 private:
  long long task_id_;
};

class NotFound : public Error {
 public:
  using Error::Error;
};

// An API used in a way it does not support (e.g. SQL on the in-memory store,
// two open transactions on one lease).
class UsageError : public Error {
 public:
  using Error::Error;
};

// The database's schema is ahead of this build: it holds a migration this eoq
// does not know and which declared that programs built before it must not run
// against it (docs/upgrading.md). Raised by migrate() and, before anything is
// claimed, by claim(); the message names the migration. Upgrade the program.
class SchemaTooNew : public UsageError {
 public:
  using UsageError::UsageError;
};

// An error reported by PostgreSQL. Keeps the SQLSTATE and the statement name.
class DatabaseError : public Error {
 public:
  DatabaseError(const std::string& message, std::string sqlstate, std::string statement)
      : Error(message), sqlstate_(std::move(sqlstate)), statement_(std::move(statement)) {}
  const std::string& sqlstate() const noexcept { return sqlstate_; }
  const std::string& statement() const noexcept { return statement_; }
  // True when the same call may succeed later (connection lost, serialization
  // failure, deadlock, server shutting down).
  virtual bool transient() const noexcept { return false; }

 private:
  std::string sqlstate_, statement_;
};

// Connection lost, server restarting, serialization failure, deadlock: retry later.
class TransientError : public DatabaseError {
 public:
  using DatabaseError::DatabaseError;
  bool transient() const noexcept override { return true; }
};

// The connection broke while a COMMIT was in flight and the server could not be
// asked afterwards: the change may or may not have been applied.
class CommitInDoubt : public TransientError {
 public:
  using TransientError::TransientError;
};

}  // namespace eoq
