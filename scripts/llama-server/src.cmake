# scripts/llama-cpp puts this file at src/CMakeLists.txt of the assembled llama-server tree: instead
# of compiling llama.cpp's src/ a second time, `llama` is the one libllama that llama-cpp-sys-2
# built (IAPT_LLAMA_LIB), with its public headers, linked to the ggml package of the same build.
add_library(llama INTERFACE)
target_link_libraries(llama INTERFACE ${IAPT_LLAMA_LIB} ggml)
target_include_directories(llama INTERFACE ${PROJECT_SOURCE_DIR}/include)
