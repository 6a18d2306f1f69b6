# scripts/llama-cpp puts this file at tools/CMakeLists.txt of the assembled llama-server tree: only
# what llama-server needs (the UI assets target, mtmd, the server), with a compatibility header for
# the server's sources (IAPT_COMPAT_H, see compat.h), and llama-batched-bench (llama.cpp's decode
# throughput alone, bench/tenants).
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(ui)
add_subdirectory(mtmd)
add_subdirectory(server)
add_subdirectory(batched-bench)
target_compile_options(server-context PRIVATE -include ${IAPT_COMPAT_H})
