-- codevista for Neovim: streamed ghost text, translation and image explanation, from the
-- `codevista serve` language server. The server owns prompts and models; this file owns
-- the experience: when to ask, how ghost text is drawn, what keys do.

local M = {}

local defaults = {
  cmd = { "codevista", "serve" }, -- how to start the server
  filetypes = { "python", "java", "cs", "c", "cpp", "javascript", "typescript", "go", "rust",
    "lua", "sh", "ruby", "php", "kotlin", "swift", "scala" },
  settings = {}, -- sent as initializationOptions: modelPath, maxTokens, temperature, ...
  debounce_ms = 60,
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-w>",
    accept_line = "<M-l>",
    dismiss = "<C-]>",
    next = "<M-]>",
    prev = "<M-[>",
  },
  hl_group = "Comment",
  on_render = nil, -- function(text): called whenever the ghost text changes (nil = cleared)
}

M.config = nil
M.status = { state = "stopped", model = "", message = "" }
local ns = vim.api.nvim_create_namespace("codevista")
local state = {
  timer = nil,
  request = nil, -- { client, id, token, bufnr }
  suggestion = nil, -- { bufnr, row, col, text }
  tokens = {}, -- partial result token -> callback(value)
  seq = 0,
}

-- Neovim 0.11 made client methods take self (`client:request`); 0.10 did not.
local NEW_API = vim.fn.has("nvim-0.11") == 1
local function req(client, method, params, handler, bufnr)
  if NEW_API then return client:request(method, params, handler, bufnr) end
  return client.request(method, params, handler, bufnr)
end
local function cancel(client, id)
  if NEW_API then return client:cancel_request(id) end
  return client.cancel_request(id)
end

local function log(msg, level)
  vim.schedule(function() vim.notify("codevista: " .. msg, level or vim.log.levels.INFO) end)
end

function M.client(bufnr)
  local clients = vim.lsp.get_clients({ name = "codevista", bufnr = bufnr })
  return clients[1]
end

local function new_token(prefix)
  state.seq = state.seq + 1
  return string.format("codevista-%s-%d-%d", prefix, vim.uv.getpid(), state.seq)
end

-- ghost text ------------------------------------------------------------------------------

function M.clear()
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_valid(buf) then
      vim.api.nvim_buf_clear_namespace(buf, ns, 0, -1)
    end
  end
  state.suggestion = nil
end

local function cancel_request()
  local r = state.request
  if r then
    state.tokens[r.token] = nil
    pcall(cancel, r.client, r.id)
    state.request = nil
  end
end

-- Draw `text` as ghost text at (row, col): its first line inline after the cursor, the
-- rest as virtual lines below.
local function render(bufnr, row, col, text)
  vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  if text == nil or text == "" then
    state.suggestion = nil
    return
  end
  local lines = vim.split(text, "\n", { plain = true })
  local hl = M.config.hl_group
  local opts = { virt_text = { { lines[1], hl } }, virt_text_pos = "inline", hl_mode = "combine" }
  if #lines > 1 then
    local virt_lines = {}
    for i = 2, #lines do
      virt_lines[#virt_lines + 1] = { { lines[i], hl } }
    end
    opts.virt_lines = virt_lines
  end
  pcall(vim.api.nvim_buf_set_extmark, bufnr, ns, row, col, opts)
  state.suggestion = { bufnr = bufnr, row = row, col = col, text = text }
  if M.config.on_render then M.config.on_render(text) end
end

-- The text an item inserts at the cursor (its range may start before the cursor).
local function item_text(item, row, col, bufnr)
  local text = item.insertText
  if type(text) == "table" then text = text.value end
  if type(text) ~= "string" then return nil end
  if item.range then
    local start = item.range.start
    if start.line == row and start.character < col then
      local line = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
      local typed = line:sub(start.character + 1, col)
      if text:sub(1, #typed) == typed then
        text = text:sub(#typed + 1)
      end
    end
  end
  return text
end

function M.request()
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.client(bufnr)
  if not client then return end
  cancel_request()
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local token = new_token("ghost")
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = 2 }
  params.partialResultToken = token
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  local function still_here()
    if vim.api.nvim_get_current_buf() ~= bufnr then return false end
    if vim.api.nvim_buf_get_changedtick(bufnr) ~= tick then return false end
    local c = vim.api.nvim_win_get_cursor(0)
    return c[1] - 1 == row and c[2] == col and vim.fn.mode():sub(1, 1) == "i"
  end
  local function show(items)
    if not still_here() then return end
    local first = items and items[1]
    local text = first and item_text(first, row, col, bufnr) or nil
    render(bufnr, row, col, text)
  end
  state.tokens[token] = function(value)
    if type(value) == "table" and value.items then show(value.items) end
  end
  local ok, id = req(client, "textDocument/inlineCompletion", params, function(err, result)
    state.tokens[token] = nil
    if state.request and state.request.token == token then state.request = nil end
    if err or not result then return end
    show(result.items or result)
  end, bufnr)
  if ok then
    state.request = { client = client, id = id, token = token, bufnr = bufnr }
  end
end

local function schedule_request()
  if state.timer then state.timer:stop() end
  state.timer = state.timer or vim.uv.new_timer()
  state.timer:start(M.config.debounce_ms, 0, vim.schedule_wrap(function()
    if vim.fn.mode():sub(1, 1) == "i" then M.request() end
  end))
end

-- Insert `piece` of the suggestion at the cursor; what is left stays as ghost text.
local function accept_piece(piece)
  local s = state.suggestion
  if not s or piece == "" then return false end
  local bufnr, row, col = s.bufnr, s.row, s.col
  local rest = s.text:sub(#piece + 1)
  M.clear()
  cancel_request()
  local lines = vim.split(piece, "\n", { plain = true })
  vim.api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
  local new_row = row + #lines - 1
  local new_col = (#lines == 1 and col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { new_row + 1, new_col })
  if rest ~= "" then
    render(bufnr, new_row, new_col, rest)
  end
  local client = M.client(bufnr)
  if client then
    req(client, "workspace/executeCommand",
      { command = "codevista.didAcceptCompletion", arguments = { { length = #piece } } },
      function() end, bufnr)
  end
  return true
end

function M.accept() return accept_piece(state.suggestion and state.suggestion.text or "") end

function M.accept_word()
  local s = state.suggestion
  if not s then return false end
  local word = s.text:match("^%s*[%w_]+") or s.text:match("^%s*[^%w_%s]+") or s.text
  return accept_piece(word)
end

function M.accept_line()
  local s = state.suggestion
  if not s then return false end
  local nl = s.text:find("\n", 1, true)
  return accept_piece(nl and s.text:sub(1, nl) or s.text)
end

function M.dismiss()
  local had = state.suggestion ~= nil
  cancel_request()
  M.clear()
  return had
end

function M.suggestion() return state.suggestion and state.suggestion.text or nil end

-- Whether a completion request is in flight (the ghost text may still grow).
function M.busy() return state.request ~= nil end

-- translation and images ------------------------------------------------------------------

local function scratch(filetype, name)
  vim.cmd("vsplit")
  local buf = vim.api.nvim_create_buf(true, true)
  vim.api.nvim_win_set_buf(0, buf)
  vim.bo[buf].filetype = filetype
  pcall(vim.api.nvim_buf_set_name, buf, name)
  return buf
end

local function set_text(buf, text)
  if vim.api.nvim_buf_is_valid(buf) then
    vim.api.nvim_buf_set_lines(buf, 0, -1, false, vim.split(text, "\n", { plain = true }))
  end
end

local FILETYPES = { python = "python", java = "java", csharp = "cs", c = "c", cpp = "cpp",
  javascript = "javascript", typescript = "typescript", go = "go", rust = "rust" }

-- Streams the command's text into `buf`; calls done(result) or reports the error.
local function run_command(client, bufnr, command, args, buf, done)
  local token = new_token(command)
  args.partialResultToken = token
  state.tokens[token] = function(value)
    if type(value) == "table" and type(value.text) == "string" then set_text(buf, value.text) end
  end
  req(client, "workspace/executeCommand", { command = command, arguments = { args } },
    function(err, result)
      state.tokens[token] = nil
      if err then
        set_text(buf, "codevista: " .. (err.message or vim.inspect(err)))
        log(err.message or "request failed", vim.log.levels.ERROR)
        return
      end
      set_text(buf, result.text or "")
      if done then done(result) end
    end, bufnr)
end

function M.translate(language, line1, line2)
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.client(bufnr)
  if not client then return log("the server is not attached to this buffer", vim.log.levels.WARN) end
  local args = { uri = vim.uri_from_bufnr(bufnr), targetLanguage = language }
  if line1 and line2 then
    local last = vim.api.nvim_buf_line_count(bufnr)
    local finish = line2 < last and { line = line2, character = 0 }
      or { line = line2 - 1, character = #(vim.api.nvim_buf_get_lines(bufnr, line2 - 1, line2, false)[1] or "") }
    args.range = { start = { line = line1 - 1, character = 0 }, ["end"] = finish }
  end
  local ft = FILETYPES[language:lower()] or language:lower()
  local buf = scratch(ft, "codevista://translation/" .. language .. "/" .. state.seq)
  run_command(client, bufnr, "codevista.translate", args, buf, function(result)
    pcall(vim.api.nvim_buf_set_name, buf, "codevista://" .. (result.suggestedFileName or language))
    if FILETYPES[result.targetLanguage] then vim.bo[buf].filetype = FILETYPES[result.targetLanguage] end
  end)
  return buf
end

-- A diagram's description, a located object's boxes ("[x1, y1, x2, y2]", 0-1000) and the
-- like are answers to the image tasks of `codevista.explainImage`; `task` is nil (explain),
-- "describe-diagram", "transcribe" or "locate" (which needs `question`: what to find).
function M.explain_image(path, question, task)
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.client(bufnr) or vim.lsp.get_clients({ name = "codevista" })[1]
  if not client then return log("the server is not running", vim.log.levels.WARN) end
  if task == "locate" and (not question or question == "") then
    return log("say what to find: :CodevistaLocate {path} {what}", vim.log.levels.WARN)
  end
  local args = { image = { path = vim.fn.fnamemodify(path, ":p") }, task = task }
  if question and question ~= "" then args.question = question end
  local buf = scratch("markdown", "codevista://" .. (task or "explanation") .. "/" .. state.seq)
  set_text(buf, "…")
  run_command(client, bufnr, "codevista.explainImage", args, buf, function(result)
    if task == "locate" and type(result.boxes) == "table" then
      local lines = {}
      for i, b in ipairs(result.boxes) do
        lines[#lines + 1] = string.format("box %d: [%d, %d, %d, %d] (0-1000: left, top, right, bottom)",
          i, b[1], b[2], b[3], b[4])
      end
      if #lines == 0 then lines[1] = "no box found in the answer" end
      set_text(buf, (result.text or "") .. "\n\n" .. table.concat(lines, "\n"))
    end
  end)
  return buf
end

-- A screenshot of an error: the text read by OCR (the `transcribe` task, with its language)
-- shows first, then the explanation streams below it. `path` is an image file; without one,
-- the image on the clipboard (wl-paste, xclip or pngpaste). The transcription is kept for
-- M.insert_transcription(), which puts it at the cursor of the window the flow began in.
local function clipboard_image()
  local tries = {
    { "wl-paste", "--no-newline", "--type", "image/png" },
    { "xclip", "-selection", "clipboard", "-target", "image/png", "-out" },
    { "pngpaste", "-" },
  }
  for _, cmd in ipairs(tries) do
    if vim.fn.executable(cmd[1]) == 1 then
      local out = vim.system(cmd, { text = false }):wait()
      if out.code == 0 and out.stdout and #out.stdout > 8 then
        return vim.base64.encode(out.stdout)
      end
    end
  end
  return nil
end

local function fenced(result)
  local lang = result.language or ""
  return "## Transcription" .. (lang ~= "" and (" (" .. lang .. ")") or "") .. "\n\n```"
    .. lang .. "\n" .. (result.text or "") .. "\n```\n"
end

function M.explain_screenshot(path, question)
  local bufnr = vim.api.nvim_get_current_buf()
  local origin = { win = vim.api.nvim_get_current_win(), buf = bufnr }
  local client = M.client(bufnr) or vim.lsp.get_clients({ name = "codevista" })[1]
  if not client then return log("the server is not running", vim.log.levels.WARN) end
  local image
  if path and path ~= "" then
    image = { path = vim.fn.fnamemodify(path, ":p") }
  else
    local data = clipboard_image()
    if not data then
      return log("no image file given and no image on the clipboard", vim.log.levels.WARN)
    end
    image = { data = data, mimeType = "image/png" }
  end
  local buf = scratch("markdown", "codevista://screenshot/" .. state.seq)
  vim.api.nvim_set_current_win(origin.win)
  set_text(buf, "reading the image…")
  req(client, "workspace/executeCommand", { command = "codevista.explainImage",
    arguments = { { image = image, task = "transcribe" } } }, function(err, result)
    if err then
      set_text(buf, "codevista: " .. (err.message or vim.inspect(err)))
      return log(err.message or "request failed", vim.log.levels.ERROR)
    end
    state.transcription = { text = result.text or "", language = result.language, origin = origin }
    local head = fenced(result) .. "\n## Explanation\n\n"
    set_text(buf, head .. "…")
    local token = new_token("screenshot")
    state.tokens[token] = function(value)
      if type(value) == "table" and type(value.text) == "string" then set_text(buf, head .. value.text) end
    end
    local args = { image = image, task = "explain", partialResultToken = token }
    if question and question ~= "" then args.question = question end
    req(client, "workspace/executeCommand", { command = "codevista.explainImage",
      arguments = { args } }, function(err2, res2)
      state.tokens[token] = nil
      if err2 then return set_text(buf, head .. "codevista: " .. (err2.message or "request failed")) end
      set_text(buf, head .. (res2.text or ""))
    end, bufnr)
  end, bufnr)
  return buf
end

-- Inserts the last transcription at the cursor (of the window the screenshot flow began in
-- when it is still open, else of the current one). Returns false when there is none.
function M.insert_transcription()
  local t = state.transcription
  if not t or t.text == "" then
    log("no transcription yet: run :CodevistaExplainScreenshot first", vim.log.levels.WARN)
    return false
  end
  if t.origin and vim.api.nvim_win_is_valid(t.origin.win) then
    vim.api.nvim_set_current_win(t.origin.win)
  end
  vim.api.nvim_put(vim.split(t.text, "\n", { plain = true }), "c", false, true)
  return true
end

function M.transcription() return state.transcription and state.transcription.text or nil end

-- Draws a PNG from `prompt` with the text-to-image model; the server writes it inside the
-- workspace (opts.output: a path in the workspace; opts.seed, opts.size) and the rows decoded
-- so far show in the command line. opts.done(result) gets {uri, width, height, seed}.
function M.generate_image(prompt, opts)
  opts = opts or {}
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.client(bufnr) or vim.lsp.get_clients({ name = "codevista" })[1]
  if not client then return log("the server is not running", vim.log.levels.WARN) end
  local token = new_token("image")
  local args = { prompt = prompt, seed = opts.seed, size = opts.size, partialResultToken = token }
  if opts.output then args.outputUri = vim.fn.fnamemodify(opts.output, ":p") end
  state.tokens[token] = function(value)
    if type(value) == "table" and value.rows then
      vim.api.nvim_echo({ { ("codevista: image row %d/%d"):format(value.rows, value.totalRows or 0) } },
        false, {})
    end
  end
  req(client, "workspace/executeCommand", { command = "codevista.generateImage", arguments = { args } },
    function(err, result)
      state.tokens[token] = nil
      if err then return log(err.message or "request failed", vim.log.levels.ERROR) end
      log(("image written to %s (%dx%d)"):format(vim.uri_to_fname(result.uri), result.width,
        result.height))
      if opts.done then opts.done(result) end
    end, bufnr)
end

-- server ----------------------------------------------------------------------------------

local function on_progress(err, result, ctx, cfg)
  local cb = result and state.tokens[result.token]
  if cb then return cb(result.value) end
  return vim.lsp.handlers["$/progress"](err, result, ctx, cfg)
end

local function on_status(_, result)
  if type(result) == "table" then
    M.status = { state = result.state, model = result.model, message = result.message }
    if result.state == "error" then log(result.message or "model error", vim.log.levels.ERROR) end
  end
end

function M.start(bufnr)
  local root = vim.fs.root(bufnr, { ".git" }) or vim.fn.getcwd()
  local caps = vim.lsp.protocol.make_client_capabilities()
  caps.experimental = { codevista = { streaming = true } }
  return vim.lsp.start({
    name = "codevista",
    cmd = M.config.cmd,
    root_dir = root,
    capabilities = caps,
    init_options = M.config.settings,
    handlers = { ["$/progress"] = on_progress, ["codevista/status"] = on_status },
  }, { bufnr = bufnr })
end

-- An insert-mode key that acts on the suggestion when there is one, else does what it
-- normally does. Expression mappings may not change text (textlock), so the action runs
-- right after the mapping returns.
local function map(lhs, fn, fallback)
  if not lhs or lhs == "" then return end
  vim.keymap.set("i", lhs, function()
    if state.suggestion then
      vim.schedule(fn)
      return ""
    end
    return fallback and vim.api.nvim_replace_termcodes(lhs, true, false, true) or ""
  end, { expr = true, silent = true, desc = "codevista" })
end

-- An image command's arguments: the image's path, then the rest as one string.
local function path_and_words(c)
  return c.fargs[1], table.concat(vim.list_slice(c.fargs, 2), " ")
end

function M.setup(opts)
  if M.config then return M end -- guarded: a second call changes nothing
  M.config = vim.tbl_deep_extend("force", defaults, opts or {})
  local group = vim.api.nvim_create_augroup("codevista", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group, pattern = M.config.filetypes,
    callback = function(ev) M.start(ev.buf) end,
  })
  vim.api.nvim_create_autocmd({ "TextChangedI", "TextChangedP" }, {
    group = group, callback = function() M.clear(); schedule_request() end,
  })
  vim.api.nvim_create_autocmd("CursorMovedI", {
    group = group, callback = function()
      local s = state.suggestion
      local c = vim.api.nvim_win_get_cursor(0)
      if s and (c[1] - 1 ~= s.row or c[2] ~= s.col) then M.dismiss() end
    end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group, callback = function() M.dismiss() end,
  })
  local k = M.config.keymaps
  map(k.accept, M.accept, true)
  map(k.accept_word, M.accept_word, false)
  map(k.accept_line, M.accept_line, false)
  map(k.dismiss, M.dismiss, true)
  map(k.next, function() end, false) -- the server offers one suggestion at a time
  map(k.prev, function() end, false)
  vim.api.nvim_create_user_command("CodevistaTranslate", function(c)
    M.translate(c.args, c.range > 0 and c.line1 or nil, c.range > 0 and c.line2 or nil)
  end, { nargs = 1, range = true, desc = "Translate the range (or buffer) into a language" })
  vim.api.nvim_create_user_command("CodevistaExplainImage", function(c)
    M.explain_image(path_and_words(c))
  end, { nargs = "+", complete = "file", desc = "Explain an image with the vision model" })
  vim.api.nvim_create_user_command("CodevistaDescribeDiagram", function(c)
    local path, words = path_and_words(c)
    M.explain_image(path, words, "describe-diagram")
  end, { nargs = "+", complete = "file",
    desc = "Describe a diagram's nodes and edges (labels as the OCR reads them)" })
  vim.api.nvim_create_user_command("CodevistaLocate", function(c)
    local path, words = path_and_words(c)
    M.explain_image(path, words, "locate")
  end, { nargs = "+", complete = "file", desc = "Box an object in an image: {path} {what}" })
  vim.api.nvim_create_user_command("CodevistaExplainScreenshot", function(c)
    M.explain_screenshot(path_and_words(c))
  end, { nargs = "*", complete = "file",
    desc = "Transcribe and explain a screenshot of an error (a file, or the clipboard's image)" })
  vim.api.nvim_create_user_command("CodevistaInsertTranscription", function()
    M.insert_transcription()
  end, { nargs = 0, desc = "Insert the last screenshot's transcription at the cursor" })
  vim.api.nvim_create_user_command("CodevistaGenerateImage", function(c)
    M.generate_image(c.args)
  end, { nargs = "+", desc = "Draw a PNG in the workspace from a description" })
  vim.api.nvim_set_hl(0, "CodevistaGhost", { link = M.config.hl_group, default = true })
  return M
end

return M
