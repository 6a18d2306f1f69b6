// Included first in llama-server's own sources (scripts/llama-server/tools.cmake): the one helper
// they call that llama-cpp-sys-2's common/ no longer declares. llama.cpp 0c1e570's common.cpp
// defines it as std::ifstream(fname, mode) on every platform but Windows (where it converts the
// name to UTF-16 first); the server uses it to read an MCP config file.
#pragma once
#include <fstream>
#include <string>

inline std::ifstream fs_open_ifstream(const std::string & fname, std::ios_base::openmode mode) {
    return std::ifstream(fname, mode);
}
