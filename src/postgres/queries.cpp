#include "postgres/queries.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>

namespace eoq::pg {

namespace {

bool ident_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '$' ||
         c == '"' || c == '.';
}

std::string trim(std::string s) {
  auto space = [](char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; };
  while (!s.empty() && (space(s.back()) || s.back() == ';')) s.pop_back();
  std::size_t b = 0;
  while (b < s.size() && space(s[b])) ++b;
  return s.substr(b);
}

std::vector<Query> parse(std::string_view file) {
  constexpr std::string_view kMarker = "-- name: ";
  constexpr std::string_view kGeneric = "-- plan: generic";
  std::vector<Query> out;
  std::string body;
  auto flush = [&] {
    if (!out.empty()) out.back().sql = trim(std::move(body));
    body.clear();
  };
  while (!file.empty()) {
    auto eol = file.find('\n');
    auto line = file.substr(0, eol);
    file.remove_prefix(eol == std::string_view::npos ? file.size() : eol + 1);
    if (line.starts_with(kMarker)) {
      flush();
      std::string name(line.substr(kMarker.size()));
      while (!name.empty() && name.back() == ' ') name.pop_back();
      out.push_back({name, "eoq_" + name, {}, false});
      continue;
    }
    if (line.starts_with(kGeneric) && !out.empty() && body.empty()) {
      out.back().generic = true;
      continue;
    }
    // Full-line comments stay in the file; the server need not read them.
    auto first = line.find_first_not_of(' ');
    if (first != std::string_view::npos && line.substr(first).starts_with("--")) continue;
    body.append(line).push_back('\n');
  }
  flush();
  return out;
}

// `@name@` in a statement stands for the text of the statement `name`: a part
// that several statements share (claim_lease, stage_rows), written once. A
// part may name parts of its own (claim_fate in claim_cand); `within` holds
// the parts being expanded, so that one naming itself is an error, not a loop.
std::string expanded(const std::string& sql, const std::vector<Query>& all, std::vector<std::string>& within) {
  std::string out;
  std::size_t from = 0;
  for (std::size_t at; (at = sql.find('@', from)) != std::string::npos;) {
    const auto end = sql.find('@', at + 1);
    const auto name = sql.substr(at + 1, end == std::string::npos ? std::string::npos : end - at - 1);
    auto part = std::find_if(all.begin(), all.end(), [&](const Query& p) { return p.name == name; });
    if (end == std::string::npos || part == all.end())
      throw Error(fmt::format("eoq internal: query '{}' names no part '@{}@'", within.back(), name));
    if (std::find(within.begin(), within.end(), name) != within.end())
      throw Error(fmt::format("eoq internal: part '{}' names itself, through '{}'", name, within.back()));
    out.append(sql, from, at - from);
    within.push_back(name);
    out += expanded(part->sql, all, within);
    within.pop_back();
    from = end + 1;
  }
  out.append(sql, from);
  return out;
}

std::vector<Query> expand(std::vector<Query> all) {
  const auto parts = all;
  for (auto& q : all) {
    std::vector<std::string> within{q.name};
    q.sql = expanded(q.sql, parts, within);
  }
  return all;
}

}  // namespace

const std::vector<Query>& queries() {
  static const std::vector<Query> all = expand(parse(queries_file()));
  return all;
}

Statement query(std::string_view name, std::string_view quoted_schema) {
  const auto& all = queries();
  auto it = std::find_if(all.begin(), all.end(), [&](const Query& q) { return q.name == name; });
  if (it == all.end()) throw Error(fmt::format("eoq internal: src/postgres/queries.sql has no query '{}'", name));
  // `eoq.` names the schema wherever it starts a qualified name, in a string
  // literal too ('eoq.task_ids'); `x.eoq.` is something else. `eoq_stage`,
  // the temporary stage of a bulk submit, gets the schema and a hash of its
  // definition in its name: it lives as long as the session, which a
  // transaction-pooling proxy may hand to another schema's store, or to a
  // process of another eoq version during a rolling upgrade.
  constexpr std::string_view kSchema = "eoq.", kStage = "eoq_stage";
  static const unsigned stage_hash = [&] {
    auto stage = std::find_if(all.begin(), all.end(), [](const Query& q) { return q.name == "create_stage"; });
    std::uint32_t h = 2166136261u;  // FNV-1a
    if (stage != all.end())
      for (char ch : stage->sql) h = (h ^ static_cast<unsigned char>(ch)) * 16777619u;
    return static_cast<unsigned>((h ^ (h >> 16)) & 0xffffu);
  }();
  const std::string_view inner = quoted_schema.size() >= 2 && quoted_schema.front() == '"'
                                     ? quoted_schema.substr(1, quoted_schema.size() - 2)
                                     : quoted_schema;
  std::string sql;
  sql.reserve(it->sql.size() + 64);
  const std::string& in = it->sql;
  for (std::size_t at = 0; at < in.size();) {
    const bool starts = at == 0 || !ident_char(in[at - 1]);
    if (starts && in.compare(at, kSchema.size(), kSchema) == 0) {
      sql.append(quoted_schema).push_back('.');
      at += kSchema.size();
    } else if ((starts || in[at - 1] == '.') && in.compare(at, kStage.size(), kStage) == 0 &&
               (at + kStage.size() == in.size() || !ident_char(in[at + kStage.size()]))) {
      fmt::format_to(std::back_inserter(sql), "\"eoq_stage_{}_{:04x}\"", inner, stage_hash);
      at += kStage.size();
    } else {
      sql.push_back(in[at++]);
    }
  }
  return Statement{it->prepared.c_str(), std::move(sql), it->generic};
}

}  // namespace eoq::pg
